"""What the quality benchmark writes for itself instead of into the user's dataset, and what makes two runs the
same run.

The benchmark's own copy of the dataset's preprocessed folder: a folder of symlinks to every entry of the dataset's
folder except its split files, plus the benchmark's own ``splits_final.json``. nnU-Net reads the split from
``nnUNet_preprocessed/<dataset>/``, so the benchmark's trainings run with ``nnUNet_preprocessed`` pointing at the
copy's root: the dataset's ``splits_final.json`` is never written, not even by a run killed with SIGKILL (a restore
on exit could not promise that), and a later plain ``nnUNetv2_train`` trains on the user's split.

A run's identity (``run_identity``): everything its numbers depend on besides the code (the split's cases, order,
seed, labeled count, held-out count, schedule, ramp, warm start, evaluation set). Its data part is hashed into the
run name, and the whole is recorded beside the run's scores and checkpoint, so an output folder of another identity
is refused, never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from os.path import isdir, isfile, join

from nnunet_semi.errors import SemiInputError

SPLIT_FILES = ("splits_final.json", "splits_final.original.json")
IDENTITY_FILE = "semi_benchmark_identity.json"


def link_preprocessed_copy(preprocessed_dataset: str, copy_root: str) -> str:
    """``copy_root/<dataset>``: a symlink to every entry of ``preprocessed_dataset`` but its split files, made anew
    (the entries may have changed since an earlier command). Returns the copy's dataset folder."""
    copy = join(copy_root, os.path.basename(os.path.normpath(preprocessed_dataset)))
    os.makedirs(copy, exist_ok=True)
    for name in os.listdir(copy):
        path = join(copy, name)
        if os.path.islink(path):
            os.unlink(path)
        elif name not in SPLIT_FILES:  # only links and the benchmark's own split live here
            shutil.rmtree(path) if isdir(path) else os.remove(path)
    for name in os.listdir(preprocessed_dataset):
        if name not in SPLIT_FILES:
            os.symlink(os.path.abspath(join(preprocessed_dataset, name)), join(copy, name))
    return copy


def short_hash(value) -> str:
    """6 hex digits of a JSON-serialisable value's SHA-1 (keys sorted): a name-sized fingerprint."""
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:6]


def files_digest(folder: str | None, ending: str) -> str:
    """SHA-1 prefix of every ``*ending`` file's name and bytes in ``folder`` (the test-label set); "" for None."""
    if folder is None:
        return ""
    digest = hashlib.sha1()
    for name in sorted(f for f in os.listdir(folder) if f.endswith(ending)):
        digest.update(name.encode())
        with open(join(folder, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def data_identity(split_fold: dict, order: str, seed: int, num_val: int | None, test_labels: str) -> dict:
    """The data part of a run's identity: the fold's cases (train, val, unlabeled, sorted), how they were drawn,
    the base seed and the evaluation set; its ``short_hash`` goes into the run names."""
    return {"split": {k: sorted(v) for k, v in sorted(split_fold.items())}, "order": order, "seed": seed,
            "num_val": num_val, "test_labels": test_labels}


def check_identity(folder: str, identity: dict, what: str) -> None:
    """Record ``identity`` in ``folder`` (created) or, where one is recorded, refuse a different one with a
    one-line ``SemiInputError`` naming the fields that differ."""
    os.makedirs(folder, exist_ok=True)
    recorded_file = join(folder, IDENTITY_FILE)
    if not isfile(recorded_file):
        tmp = f"{recorded_file}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(identity, f, indent=1, sort_keys=True)
        os.replace(tmp, recorded_file)
        return
    with open(recorded_file) as f:
        recorded = json.load(f)
    normalise = json.loads(json.dumps(identity))  # tuples as lists, as recorded
    differing = sorted(k for k in set(recorded) | set(normalise) if recorded.get(k) != normalise.get(k))
    if differing:
        details = ", ".join(f"{k}: {_brief(recorded.get(k))} there, {_brief(normalise.get(k))} now" for k in differing)
        raise SemiInputError(f"{what} {folder} was made by a run of another identity ({details}); it is not reused. "
                             f"Remove it, or give another output folder.")


def _brief(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else f"{text[:40]}... (hash {short_hash(value)})"
