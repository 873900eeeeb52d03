"""A Ray driver for the driver-kill test: fill the cache of DATA on the cluster at ADDRESS.

    python tests/ray_child.py ADDRESS DATA WEIGHTS CACHE RESULT [kill]

With ``kill`` the process sends itself SIGKILL when the cache is about to receive its
third chunk (two chunks are in), like ``kill -9``; RESULT gets a finished run's report.
"""

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(address, data, weights, cache, result, kill=None):
    from stacker.learners import distributed
    from stacker.features.cache import FeatureEntry
    from stacker.features.extractor import FeatureExtractor
    from stacker.data.sources import load_images

    if kill:
        append, calls = FeatureEntry.append, [0]

        def dying(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return append(self, *args, **kwargs)

        FeatureEntry.append = dying
    distributed.connect(address)
    ext = FeatureExtractor("tiny_cnn", weights=weights, input_size=32, batch_size=4, chunk_size=8, cache_dir=cache,
                           verbose=0)
    report = distributed.fill_cache(ext, load_images(data), workers=2)
    with open(result, "w") as f:
        json.dump({"computed": report.computed, "cached": report.cached, "chunks": report.chunks}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
