"""dlpipe's inference runtime: onnxruntime, numpy and pillow only (no torch, torchvision or onnx).

Example:
    >>> from dlpipe.runtime import load
    >>> clf = load("model.onnx")              # a Classifier, chosen from the file's metadata
    >>> clf.predict("digit.png", top_k=3)[0].label
"""

from dlpipe.runtime.autoencoder import Autoencoder
from dlpipe.runtime.captioner import Caption, Captioner
from dlpipe.runtime.engine import Engine, available_devices, read_metadata
from dlpipe.runtime.features import FeatureExtractor
from dlpipe.runtime.errors import (DataNotFoundError, DeviceUnavailableError, DlpipeError, InputError,
                                   ModelFileError, UsageError)
from dlpipe.runtime.images import Failure, set_max_pixels
from dlpipe.runtime.metadata import ModelInfo
from dlpipe.runtime.generator import Generator
from dlpipe.runtime.policy import Policy, PolicyOutput
from dlpipe.runtime.predictors import (Classification, Classifier, Detection, Detector, Segmentation, Segmenter,
                                       load)

__all__ = [
    "Engine", "available_devices", "load", "Captioner", "Caption", "Classifier", "Classification", "Segmenter", "Segmentation", "Detector", "Detection", "Policy", "PolicyOutput", "FeatureExtractor", "ModelInfo", "read_metadata", "Failure",
    "set_max_pixels", "Autoencoder", "Generator",
    "DlpipeError", "InputError", "ModelFileError", "DeviceUnavailableError", "DataNotFoundError", "UsageError",
]
