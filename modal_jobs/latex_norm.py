"""LaTeX tokenisation and normalisation for scoring: two strings that typeset the same formula compare equal.

Try it: python -m modal_jobs.latex_norm 'x^2 + \\left( \\frac12 \\right)'   (prints tokens and normal form)

`tokenize` splits a string the way im2latex-style datasets are spaced, and changes nothing else; it is
what the token edit rate counts. `normalize_tokens` (and `normalize`, the tokens joined by one space)
also applies the rules below; it is what the `normalized_*` metrics compare. Neither ever raises: a
prediction can be any string, balanced or not.

Tokens (both functions)
  T1. A control word (`\\frac`, `\\alpha`, `\\operatorname*`) is one token; so is a control symbol, a
      backslash and one non-letter (`\\{`, `\\,`, `\\\\`).
  T2. Every other non-space character is a token of its own: `12` is `1 2`, `\\mathrm{sin}` is
      `\\mathrm { s i n }`, as in im2latex-style data.
  T3. Whitespace between tokens means nothing: `x ^ 2` and `x^2` tokenise alike.
  T4. `\\left`, `\\right`, `\\middle` and the sizing commands (`\\big`, `\\Bigl`, ...) form one token with the
      delimiter after them: `\\left (` and `\\left(` are both `\\left(`.
  T5. Text-mode arguments (`\\text`, `\\mbox`, `\\textrm`, `\\textbf`, ...) keep their spaces: each run of
      whitespace inside them is one `~` token, leading and trailing runs dropped.

Normalisation (normalize_tokens only)
  N1. Math-mode wrappers around the whole string go: `$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]`.
  N2. Spacing commands go: `\\,` `\\:` `\\;` `\\!` `\\ ` `~` `\\quad` `\\qquad` `\\enspace` `\\thinspace`
      `\\medspace` `\\thickspace` `\\enskip` `\\negthinspace` ...; with their argument: `\\hspace{..}`,
      `\\hspace*{..}`, `\\mspace{..}`, `\\phantom{..}`, `\\hphantom{..}`, `\\vphantom{..}`, `\\vspace{..}`.
  N3. Math style declarations go: `\\displaystyle` `\\textstyle` `\\scriptstyle` `\\scriptscriptstyle`.
  N4. Synonyms are spelled one way: `\\le`->`\\leq`, `\\ge`->`\\geq`, `\\ne`->`\\neq`, `\\to`->`\\rightarrow`,
      `\\gets`->`\\leftarrow`, `\\lbrace`/`\\rbrace`->`\\{`/`\\}`, `\\lbrack`/`\\rbrack`->`[`/`]`,
      `\\vert`/`\\lvert`/`\\rvert`->`|`, `\\Vert`/`\\lVert`/`\\rVert`->`\\|`, `\\dfrac`/`\\tfrac`->`\\frac`,
      `\\dbinom`/`\\tbinom`->`\\binom`, `\\land`->`\\wedge`, `\\lor`->`\\vee`, `\\lnot`->`\\neg`,
      `\\mbox`/`\\textrm`->`\\text`.
  N5. `\\left(` vs `(`: with left_right=True (the default) `\\left`, `\\right`, `\\middle` and the sizing
      commands are dropped and the delimiter kept; the invisible `\\left.` / `\\right.` go altogether.
      With left_right=False they are kept, one token with their delimiter (T4).
  N6. Arguments are always braced: a script's argument (`x^2` -> `x ^ { 2 }`) and the arguments of
      commands whose arity is known (`\\frac12` -> `\\frac { 1 } { 2 }`, `\\sqrt2`, `\\hat x`, `\\mathbb R`).
      So `x^2` and `x^{2}` are equal. Doubled braces around an argument are one pair: `x^{{2}}` = `x^{2}`.
  N7. Redundant braces go: a bare group `{...}` that is not an argument loses its braces (`{a}+b` = `a+b`),
      unless it is the base of a script and holds more than one token (`{a+b}^2` keeps them), holds a font
      or size declaration (`{\\rm d}`) or an infix command (`{a \\over b}`), or follows an unknown control
      word (which may take it as its argument: `\\mathop{lim}`). An empty group that is not a script base
      goes (`{}^{14}C` keeps it).
  N8. A base with both a subscript and a superscript writes the subscript first: `x^2_i` = `x_i^2`.

Not rules (they change the typeset output or are too rare to be worth the risk): `\\limits`, primes
(`x'` vs `x^{\\prime}`), `\\dots` vs `\\ldots`, font commands and environments are compared as written.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

_TOKEN = re.compile(r"\\[a-zA-Z]+\*?|\\.|\S", re.DOTALL)
_CONTROL_WORD = re.compile(r"\\[a-zA-Z]+\*?")
# What may follow `\left`: a symbol or a control sequence (`(`, `.`, `\{`, `\langle`), never a letter or a brace.
_DELIMITER = re.compile(r"[^a-zA-Z{}^_]|\\.+")
_MERGED = re.compile(r"(\\[a-zA-Z]+)([^a-zA-Z].*)", re.DOTALL)

TEXT_COMMANDS = frozenset(
    r"\text \mbox \textrm \textbf \textit \textsf \texttt \textnormal \textup \textmd \hbox \operatorname"
    r" \operatorname*".split()
)
DELIMITED = frozenset(r"\left \right \middle".split())
SIZING = frozenset(
    r"\big \Big \bigg \Bigg \bigl \Bigl \biggl \Biggl \bigr \Bigr \biggr \Biggr \bigm \Bigm \biggm \Biggm".split()
)
SPACING = frozenset(
    [r"\,", r"\:", r"\;", r"\!", r"\>", "\\ ", "~"]
    + r"""\quad \qquad \enspace \enskip \thinspace \medspace \thickspace \negthinspace \negmedspace
    \negthickspace \hfill \hfil \allowbreak \nobreak""".split()
)
SPACING_WITH_ARGUMENT = frozenset(
    r"\hspace \hspace* \vspace \vspace* \mspace \phantom \hphantom \vphantom".split()
)
STYLES = frozenset(r"\displaystyle \textstyle \scriptstyle \scriptscriptstyle".split())
SYNONYMS = {
    r"\le": r"\leq", r"\ge": r"\geq", r"\ne": r"\neq", r"\to": r"\rightarrow", r"\gets": r"\leftarrow",
    r"\lbrace": r"\{", r"\rbrace": r"\}", r"\lbrack": "[", r"\rbrack": "]",
    r"\vert": "|", r"\lvert": "|", r"\rvert": "|", r"\Vert": r"\|", r"\lVert": r"\|", r"\rVert": r"\|",
    r"\dfrac": r"\frac", r"\tfrac": r"\frac", r"\dbinom": r"\binom", r"\tbinom": r"\binom",
    r"\land": r"\wedge", r"\lor": r"\vee", r"\lnot": r"\neg", r"\mbox": r"\text", r"\textrm": r"\text",
}
# Commands whose number of (braced or single-token) arguments is known; only these get N6.
ARITY = {
    **dict.fromkeys(
        r"""\sqrt \mathrm \mathbf \mathbb \mathcal \mathit \mathsf \mathtt \mathfrak \mathscr \boldsymbol \bm
        \operatorname \operatorname* \hat \widehat \bar \overline \underline \vec \overrightarrow \overleftarrow
        \tilde \widetilde \dot \ddot \dddot \check \breve \acute \grave \mathring \overbrace \underbrace
        \text \textbf \textit \textsf \texttt \textnormal \textup \textmd \hbox \pmb""".split(),
        1,
    ),
    **dict.fromkeys(r"\frac \binom \cfrac \stackrel \overset \underset".split(), 2),
}
# Inside a group these scope to the group, so its braces matter.
DECLARATIONS = frozenset(
    r"""\rm \bf \it \sf \tt \cal \mit \em \sl \sc \bfseries \itshape \rmfamily \boldmath \unboldmath
    \tiny \scriptsize \footnotesize \small \normalsize \large \Large \LARGE \huge \Huge
    \over \choose \atop \above \brack \brace \color""".split()
)
MAX_DEPTH = 100  # deeper nesting than any real formula: such a string is scored on its flat tokens


@dataclass
class Group:
    children: list = field(default_factory=list)


@dataclass
class Optional:
    """`[...]`: the optional argument of `\\sqrt`."""

    children: list = field(default_factory=list)


@dataclass
class Text:
    """A text-mode argument, kept as written (T5): never normalised inside."""

    tokens: list[str] = field(default_factory=list)


Node = str | Group | Optional | Text


# --- tokens --------------------------------------------------------------------------------------------


def _raw_tokens(latex: str) -> list[str | Text]:
    """T1-T3 and T5: tokens, with text-mode arguments cut out as Text nodes."""
    out: list[str | Text] = []
    position = 0
    while True:
        match = _TOKEN.search(latex, position)
        if match is None:
            return out
        token = match.group()
        if token[0] == "\\" and len(token) == 2 and token[1].isspace():
            token = "\\ "
        out.append(token)
        position = match.end()
        if token in TEXT_COMMANDS:
            brace = re.compile(r"\s*\{").match(latex, position)
            if brace is not None:
                text, position = _text_argument(latex, brace.end())
                out.append(text)


def _text_argument(latex: str, start: int) -> tuple[Text, int]:
    """The tokens of a text argument that opens just before `start`, and where it ends (after its `}`)."""
    depth, index = 1, start
    while index < len(latex):
        char = latex[index]
        if char == "\\":
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                break
        index += 1
    body = latex[start:index].strip()
    tokens: list[str] = []
    for piece in re.split(r"(\s+)", body):
        if not piece:
            continue
        if piece.isspace():
            tokens.append("~")
        else:
            tokens.extend(_TOKEN.findall(piece))
    return Text(tokens), min(index + 1, len(latex))


def _merge_delimiters(tokens: list[str | Text]) -> list[str | Text]:
    """T4: `\\left` (or a sizing command) and the delimiter after it become one token."""
    out: list[str | Text] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        nxt = tokens[index + 1] if index + 1 < len(tokens) else None
        if (isinstance(token, str) and (token in DELIMITED or token in SIZING) and isinstance(nxt, str)
                and _DELIMITER.fullmatch(nxt)):
            out.append(token + nxt)
            index += 2
            continue
        out.append(token)
        index += 1
    return out


def _flatten(nodes: list) -> list[str]:
    out: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Text):
            out.extend(["{", *node.tokens, "}"])
        elif isinstance(node, Group):
            out.extend(["{", *_flatten(node.children), "}"])
        else:
            out.extend(["[", *_flatten(node.children), "]"])
    return out


def tokenize(latex: str) -> list[str]:
    """im2latex-style tokens of `latex` (rules T1-T5), nothing rewritten."""
    return _flatten(_merge_delimiters(_raw_tokens(latex)))


# --- normalisation -------------------------------------------------------------------------------------


_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\[", "\\]"), ("\\(", "\\)"))


def _unwrap_math(latex: str) -> str:
    """N1."""
    text = latex.strip()
    for opening, closing in _WRAPPERS:
        if len(text) >= len(opening) + len(closing) and text.startswith(opening) and text.endswith(closing):
            return text[len(opening): len(text) - len(closing)].strip()
    return text


def _split_delimiter(token: str) -> tuple[str, str] | None:
    """`\\left(` -> (`\\left`, `(`); None for any other token."""
    match = _MERGED.fullmatch(token)
    if match and (match.group(1) in DELIMITED or match.group(1) in SIZING):
        return match.group(1), match.group(2)
    return None


def _rewrite(tokens: list[str | Text], left_right: bool) -> list[str | Text]:
    """N2 (argument-less spacing), N3, N4 and N5 on the flat token list."""
    out: list[str | Text] = []
    for token in tokens:
        if isinstance(token, Text):
            out.append(token)
            continue
        split = _split_delimiter(token)
        if split is not None:
            command, delimiter = split
            delimiter = SYNONYMS.get(delimiter, delimiter)
            if not left_right:
                out.append(command + delimiter)
            elif delimiter != ".":
                out.append(delimiter)
            continue
        if token in DELIMITED or token in SIZING:
            if not left_right:
                out.append(token)
            continue
        token = SYNONYMS.get(token, token)
        if token in SPACING or token in STYLES:
            continue
        out.append(token)
    return out


def _depth(tokens: list[str | Text]) -> int:
    depth = deepest = 0
    for token in tokens:
        if token == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif token == "}":
            depth = max(0, depth - 1)
    return deepest


def _parse(tokens: list[str | Text]) -> list[Node]:
    """Braces into Group nodes. An unmatched `}` stays a token; an unclosed `{` closes at the end."""
    root: list[Node] = []
    stack: list[list[Node]] = [root]
    for token in tokens:
        if token == "{":
            group = Group()
            stack[-1].append(group)
            stack.append(group.children)
        elif token == "}" and len(stack) > 1:
            stack.pop()
        else:
            stack[-1].append(token)
    return root


def _is_script(node: Node) -> bool:
    return node == "^" or node == "_"


def _is_control_word(node: Node) -> bool:
    return isinstance(node, str) and _CONTROL_WORD.fullmatch(node) is not None


def _take_argument(nodes: list[Node], index: int) -> tuple[Node, int]:
    """One argument starting at nodes[index], as a Group (N6); Text stays Text."""
    node = nodes[index]
    if isinstance(node, Text):
        return node, index + 1
    if isinstance(node, Group):
        children = _sequence(node.children)
        if len(children) == 1 and isinstance(children[0], Group):
            children = children[0].children  # `{{x}}` is `{x}`
        return Group(children), index + 1
    if isinstance(node, str) and node in ARITY:
        command, index = _command(nodes, index)
        return Group(command), index
    return Group([node]), index + 1


def _command(nodes: list[Node], index: int) -> tuple[list[Node], int]:
    """A command of known arity with its (optional and) required arguments."""
    name = nodes[index]
    out: list[Node] = [name]
    index += 1
    if name == r"\sqrt" and index < len(nodes) and nodes[index] == "[":
        end = index + 1
        while end < len(nodes) and nodes[end] != "]":
            end += 1
        if end < len(nodes):
            out.append(Optional(_sequence(nodes[index + 1: end])))
            index = end + 1
    for _ in range(ARITY[name]):
        if index >= len(nodes) or _is_script(nodes[index]):
            break
        argument, index = _take_argument(nodes, index)
        out.append(argument)
    return out, index


def _keeps_braces(children: list[Node]) -> bool:
    return any(isinstance(child, str) and child in DECLARATIONS for child in children)


def _base(nodes: list[Node], index: int, previous: Node | None) -> tuple[list[Node], int]:
    """One base (a token, a command with its arguments, or a group), braces dropped where redundant (N7)."""
    node = nodes[index]
    if isinstance(node, Group):
        children = _sequence(node.children)
        scripted = index + 1 < len(nodes) and _is_script(nodes[index + 1])
        if _is_control_word(previous) or _keeps_braces(children):
            return [Group(children)], index + 1
        if scripted:
            single = len(children) == 1 and not _is_script(children[0])
            return (children if single else [Group(children)]), index + 1
        return children, index + 1
    if isinstance(node, str) and node in SPACING_WITH_ARGUMENT:
        if index + 1 < len(nodes) and isinstance(nodes[index + 1], Group):
            return [], index + 2
        return [], index + 1
    if isinstance(node, str) and node in ARITY:
        return _command(nodes, index)
    return [node], index + 1


def _sequence(nodes: list[Node]) -> list[Node]:
    """N6-N8 over one list of siblings."""
    out: list[Node] = []
    index = 0
    while index < len(nodes):
        base: list[Node] = []
        if not _is_script(nodes[index]):
            base, index = _base(nodes, index, out[-1] if out else None)
        scripts: list[tuple[str, Node | None]] = []
        while index < len(nodes) and _is_script(nodes[index]):
            operator = nodes[index]
            if index + 1 < len(nodes) and not _is_script(nodes[index + 1]):
                argument, index = _take_argument(nodes, index + 1)
            else:
                argument, index = None, index + 1
            scripts.append((operator, argument))  # type: ignore[arg-type]
        if len(scripts) == 2 and [op for op, _ in scripts] == ["^", "_"]:
            scripts.reverse()  # N8
        out.extend(base)
        for operator, argument in scripts:
            out.append(operator)
            if argument is not None:
                out.append(argument)
    return out


def normalize_tokens(latex: str, left_right: bool = True) -> list[str]:
    """Tokens of `latex` after rules T1-T5 and N1-N8 (see the module docstring)."""
    tokens = _rewrite(_merge_delimiters(_raw_tokens(_unwrap_math(latex))), left_right)
    if _depth(tokens) > MAX_DEPTH:
        return _flatten(tokens)
    return _flatten(_sequence(_parse(tokens)))


def normalize(latex: str, left_right: bool = True) -> str:
    """The normal form as a string: normalize_tokens joined by single spaces."""
    return " ".join(normalize_tokens(latex, left_right))


if __name__ == "__main__":
    for argument in sys.argv[1:] or [r"x^2 + \left( \frac12 \right)"]:
        print("tokens:    ", " ".join(tokenize(argument)))
        print("normalized:", normalize(argument))
