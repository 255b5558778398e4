"""The checkpoint directory, checked before training starts: a folder Titanax may write to and
that holds no numbered folders of someone else's (Orbax would take them for steps and delete them)."""

from __future__ import annotations

import os

from titanax.exceptions import CheckpointError

__all__ = ["check_directory", "listing"]


def check_directory(directory: str, keep: int | None) -> None:
    """Refuse a checkpoint directory that is a file, or that holds numbered folders Orbax would
    take for steps (and delete as old ones) although Titanax did not write them."""
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        problem = ("is an existing file, not a directory" if existing == directory
                   else f"cannot be created: {existing} is a file")
        raise CheckpointError(
            f"checkpoint directory {directory} {problem}",
            suggestion="give OrbaxCheckpoint a directory of its own, e.g. "
            f"{os.path.splitext(existing)[0]}_checkpoints",
            owner="OrbaxCheckpoint", field="directory", value=directory,
        )
    if existing != directory:
        try:  # now rather than in Orbax's background thread once training runs
            os.makedirs(directory, exist_ok=True)
        except OSError as err:
            raise CheckpointError(
                f"checkpoint directory {directory} cannot be created: {err.strerror} ({existing} is "
                "the nearest folder that exists)",
                suggestion="choose a directory under a folder you may write to, e.g. runs/<name>",
                owner="OrbaxCheckpoint", field="directory", value=directory,
            ) from err
        return  # new: nothing in it yet
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CheckpointError(f"checkpoint directory {directory} is not writable",
                              suggestion="choose a directory you may write to, or fix its permissions",
                              owner="OrbaxCheckpoint", field="directory", value=directory)
    foreign = []
    for name in sorted(os.listdir(directory), key=lambda n: (len(n), n)):
        path = os.path.join(directory, name)
        # A Titanax step, even a damaged one, keeps its 'state' folder or its JSON record.
        if name.isdigit() and os.path.isdir(path) and not (
                os.path.isdir(os.path.join(path, "state"))
                or os.path.isfile(os.path.join(path, "meta", "metadata"))):
            foreign.append(name)
    if foreign:
        first = os.path.join(directory, foreign[0])
        files = listing(first)[:5]
        holds = f"holds {files}" if files else "is empty"
        raise CheckpointError(
            f"{directory} holds numbered folders that are not Titanax checkpoints: "
            f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''} (none has the 'state' folder "
            f"or the 'meta' record a Titanax step writes; {first} {holds})",
            suggestion="point OrbaxCheckpoint at a directory of its own, e.g. "
            f"{os.path.join(directory, 'checkpoints')}: here those folders would count as steps"
            + (f", and the oldest would be deleted to keep {keep}" if keep is not None else ""),
            owner="OrbaxCheckpoint", field="directory", value=directory,
        )


def listing(step_dir: str) -> list[str]:
    out = []
    for root, _, files in os.walk(step_dir):
        out.extend(os.path.relpath(os.path.join(root, f), step_dir) for f in files)
    return sorted(out)[:20]
