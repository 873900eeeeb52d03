"""Run a model directory through every entry point in a child process and say what it touched outside.

:func:`touched_outside` runs ``Ensemble.load`` + predict, ``stacker.predict`` and ``stacker
predict`` (each in a fresh process, ``sandbox_child.py``) and returns, per entry point, the
exit code, stderr and the recorded events that reach outside what a prediction may touch:
the model directory, the image, this Python installation and the checkout's code (reading
only), and the system's read-only places (``/proc``, ``/sys``, ``/dev``, shared libraries).
The child gets a home of its own: ``$TMPDIR`` and ``$MPLCONFIGDIR`` there are its scratch
(TensorFlow's autograph and ``tempfile`` write there), and of ``$KERAS_HOME`` it may only
read ``keras.json``. Anything else read or written, any network use and any process started
count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# ``STACKER_UNDER_TEST=/path/to/checkout`` runs the children on another build (e.g. the one before a fix,
# to show a test fails there); its own code is then read like the installation.
UNDER_TEST = os.environ.get("STACKER_UNDER_TEST")


def child_env(**extra) -> dict:
    """The children's environment: ``extra``, and the build under test first on their path."""
    return {**extra, **({"PYTHONPATH": os.pathsep.join([UNDER_TEST, os.path.join(REPO, "tests")])}
                        if UNDER_TEST else {})}


def fit_tiny_model(root, models, onnx=None):
    """``(ensemble, images)``: the tiny test backbone with ``models``, fitted on two classes and saved in root/model."""
    import stacker
    from conftest import TINY, make_class_folders, save_tiny_weights

    make_class_folders(root / "train", 8)
    weights = save_tiny_weights(root / "tiny.weights.h5")
    data = stacker.load_images(root / "train")
    ens = stacker.Ensemble(backbones=[{**TINY, "weights": weights}], models=models, cv=2, random_state=0,
                           verbose=0).fit(data)
    ens.save(root / "model", onnx=onnx)
    return ens, data


def image_copy(data, folder):
    """One training image of ``data`` copied to ``folder/image.png``: the image every child predicts."""
    import shutil

    image = folder / "image.png"
    shutil.copy(data.paths[0], image)
    return image


def saved_backbone_file(root, suffix: str, onnx=None):
    """``(images, model dir, path of its one backbone file ending in suffix)``: a tiny logistic model, saved."""
    _ens, data = fit_tiny_model(root, ("logistic",), onnx=onnx)
    found = [p for p in os.listdir(root / "model" / "backbones") if p.endswith(suffix)]
    assert len(found) == 1
    return data, root / "model", "backbones/" + found[0]


def forged_copy(source, rel, tmp_path, rewrite):
    """``(model dir, forged file)``: a copy of ``source`` in tmp_path/model whose file ``rel`` ``rewrite(path)``
    changed, the manifest's sha256s rewritten as whoever forges a directory can."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(source, model)
    rewrite(model / rel)
    rehash(model)
    return model, model / rel


def rehash(model_dir) -> None:
    """Rewrite the sha256 of every file in the manifest, as whoever forges a directory can."""
    import hashlib

    path = os.path.join(str(model_dir), "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    for rel in manifest["files"]:
        with open(os.path.join(str(model_dir), rel), "rb") as f:
            manifest["files"][rel] = hashlib.sha256(f.read()).hexdigest()
    with open(path, "w") as f:
        json.dump(manifest, f)
ENTRIES = ("load", "predict", "cli")
_SYSTEM_READ = ("/proc/", "/sys/", "/dev/", "/usr/", "/lib", "/etc/", "/opt/")


def home_dirs(tmp_path) -> dict:
    """The child's own home, scratch and Keras folders (made empty for each run)."""
    root = os.path.join(str(tmp_path), "sandbox-home")
    dirs = {"HOME": root, "TMPDIR": os.path.join(root, "tmp"), "MPLCONFIGDIR": os.path.join(root, "mpl"),
            "KERAS_HOME": os.path.join(root, "keras")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    return dirs


def _readable_roots() -> tuple:
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, REPO, UNDER_TEST, *sysconfig.get_paths().values()}
    return tuple(os.path.realpath(p) + os.sep for p in paths if p)


def outside(events: list, allowed: list, readable: tuple = ()) -> list:
    """The events that touch anything but ``allowed`` paths (read or write), ``readable`` files and the
    installation (read only)."""
    allowed = tuple(os.path.realpath(p) for p in allowed)
    readable_files = {os.path.realpath(p) for p in readable}
    readable = _readable_roots()
    bad = []
    for e in events:
        if e["event"] in ("connect", "resolve", "process", "url"):
            bad.append(e)
            continue
        path = os.path.realpath(e["target"]) if os.path.isabs(e["target"]) else os.path.realpath(e["target"])
        if any(path == a or path.startswith(a + os.sep) for a in allowed):
            continue
        writes = e["event"] != "open" or e["write"]
        if not writes and (path in readable_files or path.startswith(readable) or path.startswith(_SYSTEM_READ)):
            continue
        bad.append({**e, "resolved": path})
    return bad


def run_entry(entry: str, model_dir, image, tmp_path, env: dict | None = None, prefix=None) -> tuple[int, str, list]:
    """``(exit code, stderr, events)`` of one entry point on ``model_dir`` in a fresh process.

    ``prefix(entry)``: a command the child runs under (e.g. ``strace``, to see system calls too).
    """
    record = os.path.join(str(tmp_path), f"record-{entry}.json")
    child_env = {**os.environ, "STACKER_ENGINE": "keras", **home_dirs(tmp_path),
                 "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")]), **(env or {})}
    command = [*(prefix(entry) if prefix else []), sys.executable, CHILD, entry, str(model_dir), str(image), record]
    proc = subprocess.run(command, capture_output=True, text=True, env=child_env, cwd=str(tmp_path), timeout=300)
    with open(record) as f:
        events = json.load(f)
    return proc.returncode, proc.stderr, events


def touched_outside(model_dir, image, tmp_path, env: dict | None = None, entries=ENTRIES, prefix=None) -> dict:
    """Entry point -> ``(exit code, stderr, events outside)`` for a model directory and one image (``prefix``:
    as for :func:`run_entry`)."""
    from concurrent.futures import ThreadPoolExecutor

    home = home_dirs(tmp_path)
    with ThreadPoolExecutor(len(entries)) as pool:  # one process each, side by side: most of a run is start-up
        runs = dict(zip(entries, pool.map(lambda e: run_entry(e, model_dir, image, tmp_path, env, prefix), entries)))
    return {entry: (code, err, outside(events, [str(model_dir), str(image), home["TMPDIR"], home["MPLCONFIGDIR"]],
                                       readable=(os.path.join(home["KERAS_HOME"], "keras.json"),)))
            for entry, (code, err, events) in runs.items()}
