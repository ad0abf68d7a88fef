"""What the PrivSA syntax positions (privcode.dp.syntax) know of each language: its tree-sitter
grammar package, the node types that are headers, the named leaves that are keywords, and the tokens
that are no operators. Keys are canonical language names (privcode.langs).

    >>> from privcode.dp.grammars import GRAMMARS, HEADER_NODES
    >>> GRAMMARS["shell"], HEADER_NODES["python"]["if_statement"]
    (('tree_sitter_bash', 'language'), 'consequence')
"""
from __future__ import annotations

#: canonical language (privcode.langs) -> (module, function returning the grammar's language pointer).
#: ``php`` is special-cased: code without ``<?php`` is parsed with ``language_php_only``.
GRAMMARS: dict[str, tuple[str, str]] = {
    "python": ("tree_sitter_python", "language"),
    "javascript": ("tree_sitter_javascript", "language"),   # JSX included
    "typescript": ("tree_sitter_typescript", "language_typescript"),
    "tsx": ("tree_sitter_typescript", "language_tsx"),
    "cpp": ("tree_sitter_cpp", "language"),
    "c": ("tree_sitter_c", "language"),
    "java": ("tree_sitter_java", "language"),
    "rust": ("tree_sitter_rust", "language"),
    "shell": ("tree_sitter_bash", "language"),
    "go": ("tree_sitter_go", "language"),
    "csharp": ("tree_sitter_c_sharp", "language"),
    "php": ("tree_sitter_php", "language_php"),
}

# Header spec per node type: which child is the body, the header being everything before it
# (up to the end of the last non-comment child that precedes the body).
#   "body"            header ends before the child in field `body`
#   "consequence"     ditto, field `consequence`
#   "body?"           ditto, but a node without that field is a header as a whole
#                     (abstract / interface methods), minus a trailing ';'
#   ""                the node is a header as a whole (signatures), minus a trailing ';'
#   ">then"           header ends *after* the first direct child token `then` (bash if/elif)
#   "body+"           header ends after the first token of the body (bash `do`)
# A node whose body field is missing and whose spec has no '?' (e.g. a C `struct S` type
# reference, a Rust unit struct) gives no header.
_FUNCS_CLASSES_JS = {
    "function_declaration": "body", "function_expression": "body", "function": "body",
    "generator_function_declaration": "body", "generator_function": "body",
    "method_definition": "body", "arrow_function": "body",
    "class_declaration": "body", "class": "body",
}
_LOOPS_IFS_JS = {
    "for_statement": "body", "for_in_statement": "body", "while_statement": "body",
    "if_statement": "consequence",
}
#: canonical language -> {tree-sitter node type: header spec} (spec syntax: see above).
HEADER_NODES: dict[str, dict[str, str]] = {
    "python": {
        "function_definition": "body", "class_definition": "body",
        "for_statement": "body", "while_statement": "body",
        "if_statement": "consequence", "elif_clause": "consequence",
    },
    "javascript": {**_FUNCS_CLASSES_JS, **_LOOPS_IFS_JS},
    "typescript": {
        **_FUNCS_CLASSES_JS, **_LOOPS_IFS_JS,
        "abstract_class_declaration": "body", "interface_declaration": "body",
        "function_signature": "", "method_signature": "", "abstract_method_signature": "",
    },
    "cpp": {
        "function_definition": "body", "class_specifier": "body", "struct_specifier": "body",
        "for_statement": "body", "for_range_loop": "body", "while_statement": "body",
        "if_statement": "consequence",
    },
    "c": {
        "function_definition": "body", "struct_specifier": "body",
        "for_statement": "body", "while_statement": "body", "if_statement": "consequence",
    },
    "java": {
        "class_declaration": "body", "interface_declaration": "body", "enum_declaration": "body",
        "record_declaration": "body", "method_declaration": "body?",
        "constructor_declaration": "body",
        "for_statement": "body", "enhanced_for_statement": "body", "while_statement": "body",
        "if_statement": "consequence",
    },
    "rust": {
        "function_item": "body", "function_signature_item": "", "impl_item": "body",
        "struct_item": "body", "enum_item": "body", "trait_item": "body",
        "for_expression": "body", "while_expression": "body", "loop_expression": "body",
        "if_expression": "consequence",
    },
    "shell": {
        "function_definition": "body", "if_statement": ">then", "elif_clause": ">then",
        "for_statement": "body+", "c_style_for_statement": "body+", "while_statement": "body+",
    },
    "go": {
        "function_declaration": "body", "method_declaration": "body", "func_literal": "body",
        "for_statement": "body", "if_statement": "consequence",
    },
    "csharp": {
        "class_declaration": "body", "struct_declaration": "body",
        "interface_declaration": "body", "record_declaration": "body",
        "method_declaration": "body?", "constructor_declaration": "body",
        "local_function_statement": "body",
        "for_statement": "body", "foreach_statement": "body", "while_statement": "body",
        "if_statement": "consequence",
    },
    "php": {
        "function_definition": "body", "method_declaration": "body?",
        "class_declaration": "body", "interface_declaration": "body",
        "for_statement": "body", "foreach_statement": "body", "while_statement": "body",
        "if_statement": "body", "else_if_clause": "body",
    },
}
HEADER_NODES["tsx"] = HEADER_NODES["typescript"]

_JS_NAMED_KW = frozenset({"this", "super", "true", "false", "null", "undefined"})
#: named leaf node types that are keywords of the language (most keywords are anonymous
#: tokens and need no listing). Only leaves whose text is a word are taken.
NAMED_KEYWORD_LEAVES: dict[str, frozenset[str]] = {
    "python": frozenset({"true", "false", "none"}),
    "javascript": _JS_NAMED_KW, "typescript": _JS_NAMED_KW, "tsx": _JS_NAMED_KW,
    "cpp": frozenset({"primitive_type", "auto", "this", "true", "false", "null"}),
    "c": frozenset({"primitive_type", "true", "false", "null"}),
    "java": frozenset({"void_type", "boolean_type", "true", "false", "null_literal", "this", "super"}),
    "rust": frozenset({"primitive_type", "mutable_specifier", "self", "super", "crate"}),
    "shell": frozenset(),
    "go": frozenset({"true", "false", "nil", "iota"}),
    "csharp": frozenset({"predefined_type", "null_literal", "this", "base"}),
    "php": frozenset({"boolean", "null"}),
}

#: anonymous punctuation tokens that are *not* counted as operators: brackets, commas and
#: semicolons only delimit (they are covered when they sit inside a header). Multi-char
#: tokens such as bash ``[[``/``((``, ``${`` or ``::`` are operators.
DELIMITER_TOKENS: frozenset[str] = frozenset({"(", ")", "[", "]", "{", "}", ",", ";"})
#: canonical language -> parent node types whose anonymous tokens are not operators
#: (the ``$`` sigil of PHP variables / bash ``$x`` is part of a name, not an operator).
NON_OPERATOR_PARENTS: dict[str, frozenset[str]] = {
    "php": frozenset({"variable_name"}),
    "shell": frozenset({"simple_expansion"}),
}
