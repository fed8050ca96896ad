"""The ``unite`` command line: the one place that knows the gateway, the distiller and the student server."""
