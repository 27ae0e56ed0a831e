"""Model definitions. Importing this package registers every built-in model."""

from dlpipe.training.models import classifiers, fcn  # noqa: F401
