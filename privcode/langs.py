"""Programming languages: one canonical name each and the names that mean the same, for the sandbox
(privcode.sandbox), the PrivSA syntax positions (privcode.dp.syntax) and code extraction
(privcode.data.prompts).

    >>> from privcode.langs import canonical_lang, names_of
    >>> canonical_lang(" Bash "), canonical_lang("C++"), canonical_lang("kotlin"), canonical_lang(None)
    ('shell', 'cpp', 'kotlin', '')
    >>> sorted(names_of("rs"))
    ['rs', 'rust']

Canonical names are Magicoder OSS-Instruct's `lang` values (python, shell, cpp, java, rust, typescript,
javascript, php, csharp, swift) plus c, go and tsx; the aliases are other `lang` spellings and markdown
fence tags. A name that is no language here is its own canonical name, lowercased.
"""
from __future__ import annotations

#: canonical language -> the other names (lowercase) that mean it
ALIASES: dict[str, tuple[str, ...]] = {
    "python": ("py", "python3", "py3", "python2"),
    "shell": ("bash", "sh", "zsh", "shellscript"),
    "cpp": ("c++", "cc", "cxx", "hpp", "h++", "cplusplus"),
    "c": (),
    "java": (),
    "rust": ("rs",),
    "typescript": ("ts",),
    "tsx": (),
    "javascript": ("js", "node", "nodejs", "jsx", "mjs", "cjs", "ecmascript"),
    "php": ("php3", "php4", "php5", "php7", "php8"),
    "csharp": ("cs", "c#", "c-sharp"),
    "swift": (),
    "go": ("golang",),
}
_CANONICAL = {alias: name for name, aliases in ALIASES.items() for alias in (name, *aliases)}


def canonical_lang(lang: str | None) -> str:
    """The canonical name of `lang` ('py' -> 'python', 'Bash' -> 'shell'); else `lang` lowercased."""
    key = (lang or "").strip().lower()
    return _CANONICAL.get(key, key)


def names_of(lang: str | None) -> frozenset[str]:
    """Every name of `lang`'s language: its canonical name and aliases ({'kotlin'} for an unknown one)."""
    name = canonical_lang(lang)
    return frozenset((name, *ALIASES.get(name, ())))
