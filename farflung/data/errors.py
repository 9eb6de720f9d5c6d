"""The one exception type of the data layer."""


class DataError(Exception):
    """A problem with corpus inputs or prepared data that the user can fix.

    Messages name the file (and line, where there is one) and say what to do, so the
    command line can print them as they are, without a traceback.
    """
