class ModelLoadError(ValueError):
    """A model file or directory that cannot be loaded; the message names the file and the problem."""
