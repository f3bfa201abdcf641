"""The built-in LaTeX OCR set: random LaTeX formulas rendered with matplotlib mathtext, no TeX install.

Same schema as unsloth/LaTeX_OCR (splits `train` and `test`; columns `image`, a PNG, and `text`, the LaTeX),
so the embedded default exercises exactly the code paths a hub dataset does.

Try it: python -m modal_jobs.synthetic [N]   (prints N formulas and writes them as PNGs to ./synthetic-preview/)
"""

from __future__ import annotations

import io
import random
import re
import sys
from typing import TYPE_CHECKING

from modal_jobs.config import SyntheticDatasetConfig

if TYPE_CHECKING:
    from concurrent.futures import Executor

    import datasets

# Part of every fingerprint of the built-in set: bump it whenever the grammar or the rendering changes, so
# caches keyed on the old output are not reused for the new one.
SYNTHETIC_VERSION = "1"

MIN_TOKENS = 5
MAX_TOKENS = 60
FONT_SIZE = 12  # points
# At 160 dpi a plain line is ~40 px tall and a display fraction ~80 px (5th/50th/95th percentile heights of
# the default set: ~40/80/120 px), in the range of LaTeX_OCR's images.
RENDER_DPI = 160
PADDING_PX = 6
PARALLEL_MIN_ROWS = 100  # below this, starting worker processes costs more than it saves

LOWER = "abcdefghijklmnopqrstuvwxyz"
UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
GREEK = (
    r"\alpha \beta \gamma \delta \epsilon \varepsilon \zeta \eta \theta \vartheta \iota \kappa \lambda \mu \nu \xi"
    r" \pi \rho \sigma \tau \phi \varphi \chi \psi \omega \Gamma \Delta \Theta \Lambda \Xi \Pi \Sigma \Phi \Psi \Omega"
).split()
SYMBOLS = r"\infty \partial \nabla \hbar \ell".split()
BLACKBOARD = "RNZQC"
BINARY_OPS = r"+ - + - \times \cdot \pm \mp \div".split()
RELATIONS = r"= = = < > \leq \geq \neq \approx \equiv \sim \propto".split()
FUNCTIONS = r"\sin \cos \tan \log \ln \exp \sinh \cosh \arctan".split()
BRACKETS = [("(", ")"), ("[", "]"), ("|", "|"), (r"\{", r"\}")]

# Whitespace around `_` and `^` stops mathtext from attaching the script (`x _ { i }` renders as `x i`),
# though LaTeX ignores it; the label keeps im2latex spacing and only the string we render is compacted.
_SCRIPT_SPACING = re.compile(r"\s*([_^])\s*")


class _Grammar:
    """Random formulas as token lists. All randomness comes from one `random.Random`, so a seed fixes them."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def formula(self) -> list[str]:
        """Tokens of one formula; `\\dfrac` marks a fraction set in display style (the label writes `\\frac`)."""
        # Lengths spread over MIN..MAX_TOKENS rather than clustering at the grammar's natural size.
        budget = self.rng.randint(MIN_TOKENS, MAX_TOKENS)
        if budget >= 6 and self.rng.random() < 0.5:
            # Most equations in the wild have a relation somewhere.
            left = self.rng.randint(1, budget - 3)
            return [*self.expression(left, 0), self.rng.choice(RELATIONS), *self.expression(budget - left - 1, 0)]
        return self.expression(budget, depth=0)

    def expression(self, budget: int, depth: int, small: bool = False) -> list[str]:
        tokens = self.term(budget, depth, small)
        while len(tokens) < budget:
            tokens += [self.rng.choice(BINARY_OPS)] + self.term(budget - len(tokens) - 1, depth, small)
        return tokens

    def atom(self) -> list[str]:
        roll = self.rng.random()
        if roll < 0.45:
            return [self.rng.choice(LOWER)]
        if roll < 0.55:
            return [self.rng.choice(UPPER)]
        if roll < 0.75:
            # Numbers are split into digits, as in im2latex-style data.
            return list(str(self.rng.choice([self.rng.randint(0, 9), self.rng.randint(10, 999)])))
        if roll < 0.93:
            return [self.rng.choice(GREEK)]
        return [self.rng.choice(SYMBOLS)]

    def group(self, budget: int, depth: int, small: bool) -> list[str]:
        """`{ ... }`, the argument of a command."""
        return ["{", *self.expression(max(1, budget), depth + 1, small), "}"]

    def script_argument(self) -> list[str]:
        roll = self.rng.random()
        if roll < 0.4:
            return [self.rng.choice("0123456789")]
        if roll < 0.7:
            return ["{", *self.atom(), "}"]
        if roll < 0.85:
            return ["{", self.rng.choice(LOWER), self.rng.choice("+-"), self.rng.choice("123"), "}"]
        return ["{", "-", self.rng.choice("123"), "}"]

    def scripted_atom(self) -> list[str]:
        tokens = self.atom()
        roll = self.rng.random()
        if roll < 0.2:
            tokens += ["^", *self.script_argument()]
        elif len(tokens) > 1 or tokens[0].isdigit():
            pass  # subscripted numbers (`4 0 5 _ { i }`) hardly occur in real formulas
        elif roll < 0.35:
            tokens += ["_", *self.script_argument()]
        elif roll < 0.42:
            tokens += ["_", *self.script_argument(), "^", *self.script_argument()]
        return tokens

    def term(self, budget: int, depth: int, small: bool) -> list[str]:
        """One operand. `small`: inside a fraction, where LaTeX sets nested fractions in text style."""
        if depth >= 3 or budget < 4:
            return self.scripted_atom()
        rng = self.rng
        kind = rng.choices(
            ["atom", "frac", "sqrt", "paren", "bigop", "function", "mathbb", "lim"],
            weights=[30, 14, 8, 12, 7, 8, 4, 3],
        )[0]
        inner = max(1, budget // 2 - 2)
        if kind == "frac":
            numerator = self.group(rng.randint(1, inner), depth, small=True)
            denominator = self.group(rng.randint(1, inner), depth, small=True)
            return [r"\frac" if small else r"\dfrac", *numerator, *denominator]
        if kind == "sqrt":
            index = ["[", rng.choice("345n"), "]"] if rng.random() < 0.25 else []
            return [r"\sqrt", *index, *self.group(rng.randint(1, inner), depth, small)]
        if kind == "paren":
            left, right = rng.choice(BRACKETS)
            body = self.expression(rng.randint(2, max(2, budget - 3)), depth + 1, small)
            tokens = [r"\left" + left, *body, r"\right" + right] if rng.random() < 0.6 else [left, *body, right]
            if rng.random() < 0.25:
                tokens += ["^", *self.script_argument()]
            return tokens
        if kind == "bigop":
            op = rng.choice([r"\sum", r"\sum", r"\prod", r"\int", r"\int", r"\oint"])
            body = self.term(max(1, budget - 10), depth + 1, small)
            if op in (r"\int", r"\oint"):
                variable = rng.choice("xtuyz")
                upper = [r"\infty"] if rng.random() < 0.3 else self.atom()
                limits = ["_", "{", *self.atom(), "}", "^", "{", *upper, "}"] if rng.random() < 0.7 else []
                return [op, *limits, *body, "d", variable]
            index = rng.choice("ijkn")
            start = rng.choice([["0"], ["1"], ["-", r"\infty"]])
            end = rng.choice([["n"], ["N"], [r"\infty"], ["m"]])
            return [op, "_", "{", index, "=", *start, "}", "^", "{", *end, "}", *body]
        if kind == "function":
            name = rng.choice(FUNCTIONS)
            if rng.random() < 0.5:
                return [name, *self.scripted_atom()]
            argument = self.expression(rng.randint(1, max(1, budget - 3)), depth + 1, small)
            return [name, r"\left(", *argument, r"\right)"]
        if kind == "mathbb":
            tokens = [r"\mathbb", "{", rng.choice(BLACKBOARD), "}"]
            return tokens + (["^", rng.choice("n23")] if rng.random() < 0.4 else [])
        if kind == "lim":
            variable = rng.choice("xnth")
            target = rng.choice([["0"], [r"\infty"], ["1"], ["a"]])
            body = self.term(max(1, budget - 8), depth + 1, small)
            return [r"\lim", "_", "{", variable, r"\to", *target, "}", *body]
        return self.scripted_atom()


def label_of(tokens: list[str]) -> str:
    """The training label: im2latex-style spacing, and `\\frac` whatever style the image used."""
    return " ".join(r"\frac" if token == r"\dfrac" else token for token in tokens)


def render_latex(latex: str) -> bytes:
    """PNG bytes of `latex` rendered as math on white, cropped to the ink plus a small margin.

    Raises ValueError when mathtext cannot parse the string.
    """
    import matplotlib
    import numpy as np
    from PIL import Image

    # Pinned, so a user's matplotlibrc cannot change the pixels and with them every fingerprint downstream.
    with matplotlib.rc_context({"text.hinting": "force_autohint"}):
        raster = _parser().parse(f"${_for_mathtext(latex)}$", dpi=RENDER_DPI, prop=_font(), antialiased=True)
    ink = np.asarray(raster.image)
    if ink.size == 0 or not ink.any():
        raise ValueError(f"{latex!r} renders to an empty image")
    pixels = np.pad(255 - ink, PADDING_PX, constant_values=255)
    buffer = io.BytesIO()
    # RGB, like the photos-and-scans datasets users bring; some image processors mishandle 2-D arrays.
    # compress_level 1: files ~10% larger than the default, written several times faster.
    Image.fromarray(pixels, "L").convert("RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _for_mathtext(latex: str) -> str:
    return _SCRIPT_SPACING.sub(r"\1", latex)


_PARSER = None


def _parser():
    global _PARSER
    if _PARSER is None:
        from matplotlib.mathtext import MathTextParser

        # Rasterises straight to an array: no Figure, no backend; ~8 ms a formula, nearly all of it parsing.
        _PARSER = MathTextParser("agg")
    return _PARSER


def _font():
    from matplotlib.font_manager import FontProperties

    # Computer Modern ships with matplotlib, so the images look like LaTeX output without a TeX install.
    return FontProperties(size=FONT_SIZE, math_fontfamily="cm")


def _render_or_none(latex: str) -> bytes | None:
    try:
        return render_latex(latex)
    except ValueError:
        return None


def _formulas(
    rng: random.Random, count: int, taken: set[str], split: str, pool: Executor | None = None
) -> list[tuple[str, bytes]]:
    """`count` (label, PNG) rows: the first `count` drawn formulas that render, in draw order.

    Formulas are drawn here, in order, and only rendered in `pool`, so the rows do not depend on how many
    workers there are or which finishes first.
    """
    from tqdm import tqdm

    grammar = _Grammar(rng)
    rows: list[tuple[str, bytes]] = []
    with tqdm(total=count, desc=f"render synthetic {split}", unit="img", file=sys.stderr, leave=False) as bar:
        while len(rows) < count:
            batch: list[tuple[str, str]] = []
            while len(batch) < count - len(rows):
                tokens = grammar.formula()
                if not MIN_TOKENS <= len(tokens) <= MAX_TOKENS:
                    continue
                label = label_of(tokens)
                # `taken` holds train's strings while test is drawn, so no test row is a copy of a train row.
                if label in taken:
                    continue
                taken.add(label)
                batch.append((label, " ".join(tokens)))
            sources = [source for _, source in batch]
            pngs = pool.map(_render_or_none, sources, chunksize=16) if pool else map(_render_or_none, sources)
            for (label, _), png in zip(batch, pngs):
                # A formula mathtext rejects is skipped; the next round draws its replacement.
                if png is not None:
                    rows.append((label, png))
                    bar.update()
    return rows


def _render_pool(rows: int) -> Executor | None:
    """Worker processes for rendering when there is enough of it to pay for them (mathtext's parser is pure
    Python, ~8 ms a formula, so threads would not help). None means render here, serially."""
    import multiprocessing
    import os
    import threading
    from concurrent.futures import ProcessPoolExecutor

    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    if workers < 2 or rows < PARALLEL_MIN_ROWS:
        return None
    # fork: a worker starts in milliseconds with matplotlib already loaded, where spawn would re-import it
    # and re-run the caller's __main__. Forking a process that runs other threads can deadlock the child on
    # a lock one of them held, so a threaded caller (a Prefect worker, say) renders serially instead. tqdm's
    # monitor thread (left behind by any earlier progress bar) is harmless: workers never touch tqdm.
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and t.name != "tqdm_monitor"]
    if "fork" not in multiprocessing.get_all_start_methods() or others:
        return None
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    # The first task forks every worker, now, while this process still has a single thread.
    pool.submit(_render_or_none, "x").result()
    return pool


def _split_rng(seed: int, split: str) -> random.Random:
    # A string seed is hashed with SHA-512, not Python's per-process salted hash, so it is stable everywhere.
    return random.Random(f"vlmpipe-synthetic-{SYNTHETIC_VERSION}:{seed}:{split}")


def synthetic_latex_ocr(cfg: SyntheticDatasetConfig) -> datasets.DatasetDict:
    """`train` (cfg.train_size rows) and `test` (cfg.test_size rows) with features image (PNG) and text.

    Deterministic: the same config gives the same strings and the same image bytes.
    """
    import datasets

    # Built before any fork (mathtext's grammar and fonts load on the first formula), so workers inherit them.
    render_latex("x")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    taken: set[str] = set()
    splits = {}
    pool = _render_pool(cfg.train_size + cfg.test_size)
    try:
        for split, size in (("train", cfg.train_size), ("test", cfg.test_size)):
            # One generator per split, seeded by name: test's formulas do not shift when train_size changes
            # (apart from skipping the rare string train already holds).
            rows = _formulas(_split_rng(cfg.seed, split), size, taken, split, pool)
            splits[split] = datasets.Dataset.from_dict(
                {"image": [{"bytes": png, "path": None} for _, png in rows], "text": [text for text, _ in rows]},
                features=features,
                split=datasets.NamedSplit(split),
            )
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return datasets.DatasetDict(splits)


def _preview(count: int) -> None:
    from pathlib import Path

    folder = Path("synthetic-preview")
    folder.mkdir(exist_ok=True)
    rows = _formulas(_split_rng(0, "train"), count, set(), "train")
    for index, (latex, png) in enumerate(rows):
        (folder / f"{index:03d}.png").write_bytes(png)
        print(f"{index:03d} ({len(latex.split())} tokens): {latex}")


if __name__ == "__main__":
    _preview(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
