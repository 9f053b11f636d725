"""The one error every export raises for a model its format cannot hold (a ValueError naming the limit)."""


class ExportError(ValueError):
    """The model cannot be exported to the format; the message names the limit."""
