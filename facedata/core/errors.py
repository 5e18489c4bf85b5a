"""The one error type the command line reports as a single line instead of a traceback."""


class UserError(ValueError):
    """A problem the user can fix (a config value, an input file, a model file), phrased as one line
    that names the file and the key, column or field."""
