"""``dlpipe serve``: a model server speaking the Open Inference Protocol (KServe v2) over REST, with Triton's
binary tensor extension, dynamic batching, backpressure and Prometheus metrics, over the torch-free
runtime (issue 13). Embed it with::

    from dlpipe.apps.serve import Repository, create_app
    app = create_app(Repository.open(["models/"]))
"""

from dlpipe.apps.serve.app import ServerLimits, create_app
from dlpipe.apps.serve.repository import ModelSettings, Repository

__all__ = ["create_app", "Repository", "ModelSettings", "ServerLimits"]
