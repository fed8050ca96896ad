"""The student server: 384-d patch and slide embeddings from an exported UNITE student, over HTTP.

Build the app with :func:`student_server.app.create_app`; run it with ``unite serve-student``.
"""
