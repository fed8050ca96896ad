"""The ``unite`` command line: the one package that imports the gateway, the distiller and the student server."""
