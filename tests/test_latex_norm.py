"""LaTeX tokenisation and normal form on hand-written pairs, one or more per rule in modal_jobs/latex_norm.py."""

from __future__ import annotations

import pytest

from modal_jobs.latex_norm import normalize, normalize_tokens, tokenize


@pytest.mark.parametrize(
    ("latex", "tokens"),
    [
        (r"\frac{a}{b}", r"\frac { a } { b }"),  # T1
        (r"\operatorname*{max}", r"\operatorname* { m a x }"),  # T1 (starred) and T5
        (r"a\,b\\c", r"a \, b \\ c"),  # T1: control symbols
        ("x_{12}", "x _ { 1 2 }"),  # T2: digits one by one
        (r"\mathrm{sin}", r"\mathrm { s i n }"),  # T2: letters one by one
        ("x   ^  2", "x ^ 2"),  # T3
        (r"\left (x\right )", r"\left( x \right)"),  # T4
        (r"\Bigl[ x \Bigr]", r"\Bigl[ x \Bigr]"),  # T4
        (r"\left\langle x \right\rangle", r"\left\langle x \right\rangle"),  # T4
        (r"\text{ if  x }", r"\text { i f ~ x }"),  # T5: inner runs kept as one ~, ends dropped
    ],
)
def test_tokenize(latex, tokens):
    assert " ".join(tokenize(latex)) == tokens


def test_tokenize_rewrites_nothing():
    assert tokenize("x^2") != tokenize("x^{2}")
    assert tokenize(r"\left( x \right)") != tokenize("( x )")
    assert tokenize(r"\bigcup \leftarrow") == [r"\bigcup", r"\leftarrow"]  # not \big + cup, not \left + arrow


EQUAL = [
    # N1: math wrappers
    ("$x^2$", "x^2"),
    (r"\[ a+b \]", "a+b"),
    ("$$a$$", "a"),
    # N2: spacing commands, with and without argument
    (r"a \, b \; c \quad d \! e ~ f", "a b c d e f"),
    (r"a \hspace{1em} b \hspace*{2pt} c", "a b c"),
    (r"a \phantom{xx} b", "a b"),
    # N3: style declarations
    (r"\displaystyle \sum_i x_i", r"\sum_i x_i"),
    (r"{\displaystyle x}", "x"),
    # N4: synonyms
    (r"a \le b \ge c \ne d", r"a \leq b \geq c \neq d"),
    (r"\lim_{x \to 0}", r"\lim_{x \rightarrow 0}"),
    (r"\dfrac{1}{2} + \tfrac12", r"\frac{1}{2} + \frac{1}{2}"),
    (r"\lbrace x \rbrace", r"\{ x \}"),
    (r"\lvert x \rvert", "| x |"),
    (r"\mbox{if}", r"\text{if}"),
    # N5: \left and sizing commands (default: dropped)
    (r"\left( x \right)", "( x )"),
    (r"\left. \frac{a}{b} \right|_{0}", r"\frac{a}{b} |_{0}"),
    (r"\left\lbrace x \right\rbrace", r"\{ x \}"),
    (r"\bigl( x \bigr)", "( x )"),
    (r"\Big[ x \Big]", "[ x ]"),
    # N6: arguments always braced
    ("x^2", "x^{2}"),
    ("x ^ { 2 }", "x^2"),
    ("x_i", "x_{i}"),
    (r"\frac12", r"\frac{1}{2}"),
    (r"\frac1{x+1}", r"\frac{1}{x+1}"),
    (r"\sqrt2", r"\sqrt{2}"),
    (r"\sqrt[3]8", r"\sqrt[3]{8}"),
    (r"\hat x", r"\hat{x}"),
    (r"\mathbb R^n", r"\mathbb{R}^{n}"),
    ("x^{{2}}", "x^{2}"),
    (r"\frac{{a}}{b}", r"\frac{a}{b}"),
    (r"x^\alpha", r"x^{\alpha}"),
    (r"e^\frac12", r"e^{\frac{1}{2}}"),
    # N7: redundant braces
    ("{a}+b", "a+b"),
    ("{a+b}", "a+b"),
    (r"{\frac{a}{b}}", r"\frac{a}{b}"),
    ("{x}^2", "x^2"),
    ("{}a", "a"),
    # N8: subscript before superscript
    ("x^2_i", "x_i^2"),
    (r"\sum^{n}_{i=1}", r"\sum_{i=1}^{n}"),
]

DIFFERENT = [
    ("x^2", "x^3"),
    ("x^{23}", "x^2 3"),  # the braces decide what is raised
    ("{a+b}^2", "a+b^2"),  # a group as a script base keeps its braces
    (r"{\rm d}x", r"\rm dx"),  # a declaration scopes to its group
    (r"{a \over b} c", r"a \over b c"),  # so does an infix command
    (r"\mathop{lim}", r"\mathop lim"),  # an unknown command may take the group as its argument
    ("{}^{14}C", "^{14}C"),  # an empty group as a script base stays
    (r"x^{\prime}", "x'"),  # primes are not rewritten
    (r"\frac{a}{b}", r"\frac{b}{a}"),
    (r"\text{a b}", r"\text{ab}"),  # spaces matter in text mode
    (r"\sqrt[3]{x}", r"\sqrt{x}"),
    ("x_i^2", "x_i 2"),
    ("x^2_i", "x^{2_i}"),
]


@pytest.mark.parametrize(("a", "b"), EQUAL)
def test_equal_after_normalisation(a, b):
    assert normalize(a) == normalize(b), (normalize(a), normalize(b))


@pytest.mark.parametrize(("a", "b"), DIFFERENT)
def test_still_different_after_normalisation(a, b):
    assert normalize(a) != normalize(b)


def test_normal_form_is_spaced_and_braced():
    assert normalize(r"\frac12+x^2_i") == r"\frac { 1 } { 2 } + x _ { i } ^ { 2 }"
    assert normalize(r"\left( a \right)") == "( a )"


def test_left_right_kept_when_configured():
    assert normalize(r"\left( x \right)", left_right=False) == r"\left( x \right)"
    assert normalize(r"\left ( x \right )", left_right=False) == normalize(r"\left(x\right)", left_right=False)
    assert normalize(r"\left( x \right)", left_right=False) != normalize("( x )", left_right=False)
    # Synonyms still apply to the delimiter.
    assert normalize(r"\left\lbrace x \right\rbrace", left_right=False) == r"\left\{ x \right\}"


def test_text_arguments_are_left_alone():
    # Spacing inside \text is text, not a spacing command, and its braces are not "redundant".
    assert normalize(r"\text{a  b}") == r"\text { a ~ b }"
    assert normalize(r"x \quad \text{if} \quad y") == r"x \text { i f } y"


def test_idempotent_outside_text_mode():
    # (Inside \text the normal form spaces every character, which re-reads as text spaces.)
    for a, _ in EQUAL + DIFFERENT:
        if r"\text" in a or r"\mbox" in a:
            continue
        once = normalize(a)
        assert normalize(once) == once, a


@pytest.mark.parametrize(
    "garbage",
    ["", "   ", "}", "{", "}}{{", r"\left", "x^", "^_^", r"\frac{", r"\sqrt[", "\\", "$", r"\text{", "{" * 5000 + "x"],
)
def test_never_raises_on_garbage(garbage):
    assert isinstance(normalize_tokens(garbage), list)
    assert isinstance(tokenize(garbage), list)


def test_unbalanced_braces_do_not_swallow_the_rest():
    assert normalize("a } b") == "a } b"
    assert normalize("{a + b") == "a + b"
