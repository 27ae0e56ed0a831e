"""Model definitions. Importing this package registers every built-in model."""

from dlpipe.training.models import captioner, classifiers, dqn, fcn, rcnn, transfer  # noqa: F401
