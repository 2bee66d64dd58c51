"""What the commands write: output bundles (a tensors file, a picture, a manifest) built in a
temporary folder and moved into place, default folder names, and the one check every command makes
before it writes (:func:`check_out`: never overwrite earlier results unless --force)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import CLIError
from .jsonform import digest

OUTPUT_FILES = ("samples.safetensors", "samples.png", "manifest.json")
LATENT_FILES = ("latent.safetensors", "manifest.json")
RESTORE_FILES = ("restored.safetensors", "restore.png", "manifest.json")
LISTED = 3  # an existing output names at most this many files


def existing_outputs(out: Path, files: Sequence[str] = OUTPUT_FILES) -> list[str]:
    """Those of ``files`` (names in ``out``) that ``out`` holds."""
    return [f for f in files if (out / f).exists()] if out.is_dir() else []


def refuse(what: str, action: str = "overwrite") -> NoReturn:
    """Stop without --force: ``<what>; pass --force to <action>, or choose another --out``."""
    raise CLIError(f"{what}; pass --force to {action}, or choose another --out")


def check_out(out: Path, files: Sequence[str], force: bool) -> None:
    """The check before a command writes ``files`` into ``out``: ``out`` is a folder or not there yet,
    and unless ``force`` it holds none of them (a CLIError naming those it holds)."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} exists and is not a directory")
    existing = existing_outputs(out, files)
    if existing and not force:
        held = ", ".join(existing[:LISTED]) + (f" and {len(existing) - LISTED} more" if len(existing) > LISTED else "")
        refuse(f"{out} already holds {held}")


def default_out(stem: str, settings: dict) -> Path:
    """diffsolve-out/<stem>, plus -<hash> of the settings that are not None (those at their defaults are
    left None, so the plain runs keep plain names)."""
    settings = {k: v for k, v in settings.items() if v is not None and v != {}}
    return Path("diffsolve-out") / (f"{stem}-{digest(settings)}" if settings else stem)


def write_atomically(out: Path, write: Callable[[Path], list[str]]) -> list[str]:
    """Build the files in a temporary directory beside ``out``, then move each into ``out``."""
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        names = write(tmp)
        out.mkdir(exist_ok=True)
        for name in names:
            os.replace(tmp / name, out / name)
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bundle(
    tmp: Path, names: Sequence[str], tensors: dict, image: Any, manifest: dict, metadata: dict | None = None
) -> list[str]:
    """Write ``names`` = (tensors file, png, manifest) into ``tmp`` (the png only if ``image``), every
    file with the umask's mode."""
    from safetensors.torch import save_file

    tensor_file, png, manifest_file = names
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / tensor_file), metadata=metadata)
    written = [tensor_file]
    if image is not None:
        image.save(tmp / png, format="PNG")
        written.append(png)
    (tmp / manifest_file).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    written.append(manifest_file)
    umask_mode(tmp, *written)
    return written


def umask_mode(folder: Path, *names: str) -> None:
    """Give the files ``names`` in ``folder`` the mode of the last one, a text file written as the
    umask says (safetensors alone would create its file 0600)."""
    mode = (folder / names[-1]).stat().st_mode & 0o777
    for name in names[:-1]:
        os.chmod(folder / name, mode)


def wrote(out: Path, names: Sequence[str]) -> None:
    """Print where the files went."""
    print(f"wrote {', '.join(str(out / n) for n in names)}")
