"""Model definitions. Importing this package registers every built-in model."""

from dlpipe.training.models import captioner, classifiers, dqn, fcn, rcnn, transfer  # noqa: F401
from dlpipe.training.models import rbm  # noqa: F401  (rbm, dbn: issue 15)
from dlpipe.training.models import classic  # noqa: F401  (alexnet, vgg11, vgg16, googlenet: issue 15)
from dlpipe.training.models import dcgan  # noqa: F401  (dcgan, cdcgan: issue 16)
from dlpipe.training.models import stylizer  # noqa: F401  (stylizer: issue 16)
from dlpipe.training.models import autoencoders  # noqa: F401  (ae, dae, vae, ae_classifier: issue 15)
