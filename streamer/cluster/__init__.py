"""groundwatch on a Ray cluster: the same daemon with its stages as Ray actors (docs/cluster.md).

`runner.py` the driver (the supervisor's child in the inference worker's place), `actors.py` the decoder and
detector actors (wrapping `streamer.decoder.Decoder` and `streamer.inference.InferenceWorker`), `assignment.py`
which detector actor serves which stream. Ray is the optional extra `groundwatch[cluster]`.
"""
