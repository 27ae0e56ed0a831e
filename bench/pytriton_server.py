"""A real Triton server (NVIDIA PyTriton) serving an ONNX model through onnxruntime, for the side-by-side in
``bench/serve.py --pytriton PYTHON``: Triton's HTTP front end and dynamic batcher in front of one
onnxruntime session in a Python infer function (PyTriton's way of serving a Python model), the same session
settings as ``dlpipe serve``. Runs under a Python that has ``nvidia-pytriton`` (3.10 here: see the README's
Serving section), with no dlpipe import.

Usage:
    PYTHON bench/pytriton_server.py MODEL.onnx --port P [--threads 2] [--max-batch-size 64] [--delay-us 2000]

Prints ``READY`` once Triton answers, serves the model as ``model`` on 127.0.0.1 until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import socket

import numpy as np
import onnxruntime as ort

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(uint8)": np.uint8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--delay-us", type=int, default=2000)
    args = parser.parse_args()

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs(), session.get_outputs()

    @batch
    def infer(**feeds):
        results = session.run(None, {i.name: feeds[i.name] for i in inputs})
        return {o.name: r for o, r in zip(outputs, results)}

    def tensor(spec) -> Tensor:
        return Tensor(name=spec.name, dtype=ORT_TYPES[spec.type],
                      shape=tuple(d if isinstance(d, int) else -1 for d in spec.shape[1:]))

    config = TritonConfig(http_address="127.0.0.1", http_port=args.port, grpc_address="127.0.0.1",
                          grpc_port=_free_port(), metrics_address="127.0.0.1", metrics_port=_free_port())
    with Triton(config=config) as triton:
        triton.bind(model_name="model", infer_func=infer, inputs=[tensor(i) for i in inputs],
                    outputs=[tensor(o) for o in outputs],
                    config=ModelConfig(max_batch_size=args.max_batch_size,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=args.delay_us)))
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        print("READY", flush=True)
        try:
            triton.serve()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
