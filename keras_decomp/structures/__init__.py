from . import sketch  # noqa: F401 - registers sketch(k=, l=)
