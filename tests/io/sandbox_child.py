"""Load and predict with a model directory in a child process that records what it touches.

    python sandbox_child.py ENTRY MODEL_DIR IMAGE RECORD.json

ENTRY is ``load`` (``Ensemble.load`` + ``predict_proba``), ``predict`` (``stacker.predict``)
or ``cli`` (``stacker predict``). Everything is imported first; then an audit hook
(:func:`sys.addaudithook`) records every file opened (path and mode), every directory made,
file removed or renamed, every socket connection or name look-up and every process started
while the entry point runs. The record is written to RECORD.json at exit, whatever happens;
the exit code is the entry point's (1 with the error on stderr when it raises).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: tinynet

import keras  # noqa: E402,F401 - a fresh $KERAS_HOME gets its keras.json now, not while recording
import matplotlib.font_manager  # noqa: E402,F401 - and a fresh $MPLCONFIGDIR its font cache
import tinynet  # noqa: E402,F401 - registers the test backbone

import stacker  # noqa: E402

try:
    from stacker.app import cli  # noqa: E402
except ImportError:  # a build from before the sub-packages (to show a test fails there)
    from stacker import cli  # noqa: E402

WATCHED = {"open": "open", "os.mkdir": "mkdir", "os.remove": "remove", "os.rename": "rename", "os.replace": "rename",
           "os.symlink": "symlink", "shutil.rmtree": "rmtree", "socket.connect": "connect",
           "socket.getaddrinfo": "resolve", "subprocess.Popen": "process", "os.system": "process",
           "os.exec": "process", "os.posix_spawn": "process", "urllib.Request": "url"}


def main(entry: str, model_dir: str, image: str, record_path: str) -> int:
    events, recording = [], [True]

    def hook(name, args):
        if recording[0] and name in WATCHED:
            first = args[0] if args else None
            if isinstance(first, int):  # an open file descriptor, not a path
                return
            mode = args[1] if name == "open" and len(args) > 1 else None
            events.append({"event": WATCHED[name], "target": os.fsdecode(first) if isinstance(first, (str, bytes))
                           else repr(first), "mode": mode if isinstance(mode, str) else None,
                           "write": name == "open" and _writes(args)})

    actions = {
        "load": lambda: stacker.Ensemble.load(model_dir).predict_proba([image]),
        "predict": lambda: stacker.predict([image], model=model_dir),
        "cli": lambda: cli.main(["predict", model_dir, image]),
    }
    sys.addaudithook(hook)
    code = 0
    try:
        result = actions[entry]()
        code = result if isinstance(result, int) else 0
    except BaseException as exc:  # noqa: BLE001 - any failure is reported, then recorded
        code = 1
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc()
    finally:
        recording[0] = False
        with open(record_path, "w") as f:
            json.dump(events, f)
    return code


def _writes(args) -> bool:
    mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool(isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
