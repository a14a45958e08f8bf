"""The naive baseline: what most MNIST demos serve. One HTTP server, and per request Pillow decodes the PNG,
NumPy scales it, and Keras `model.predict` runs the network on that single image.

    python -m bench.baseline --model models/mnist/1 [--port 0]

The export is a SavedModel, not a .keras file, so the Keras model is `keras.layers.TFSMLayer` over its
`predict_pixels` endpoint (28x28x1 floats in [0, 1] -> digit, probabilities) wrapped in a functional model:
`model.predict` then pays exactly what it pays in a demo. The server part is the standard library's threaded
HTTP server with keep-alive and TCP_NODELAY, so the comparison measures the inference path, not Nagle's
algorithm. Request and answer as TF Serving's REST row format: {"instances": [{"b64": ...}]} ->
{"predictions": [{"digit": d, "probability": p}]}.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import keras
import numpy as np
from PIL import Image


def load_keras_model(version_dir: str) -> keras.Model:
    inputs = keras.Input((28, 28, 1), name="pixels")
    outputs = keras.layers.TFSMLayer(version_dir, call_endpoint="predict_pixels")(inputs)
    return keras.Model(inputs, outputs)


def predict_png(model: keras.Model, png: bytes) -> dict:
    image = Image.open(io.BytesIO(png)).convert("L").resize((28, 28))
    pixels = np.asarray(image, dtype=np.float32)[None, :, :, None] / 255.0
    outputs = model.predict(pixels, verbose=0)
    probabilities = np.asarray(outputs["probabilities"])[0]
    return {"digit": int(probabilities.argmax()), "probability": float(probabilities.max())}


def make_server(model: keras.Model, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            predictions = [predict_png(model, base64.b64decode(i["b64"])) for i in body["instances"]]
            answer = json.dumps({"predictions": predictions}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

        def get_request(self):
            conn, addr = super().get_request()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn, addr

    return Server(("127.0.0.1", port), Handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a SavedModel version directory")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = make_server(load_keras_model(args.model), args.port)
    print(f"listening port={server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
