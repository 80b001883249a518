"""The grammar of the decomposition language, shipped as keras_decomp.grammar.

This folder is mapped onto the subpackage ``keras_decomp.grammar`` (see pyproject.toml) so that
``importlib.resources.files("keras_decomp.grammar") / "decomp.lark"`` finds the grammar in a
built wheel and in an editable install. It holds no code.
"""
