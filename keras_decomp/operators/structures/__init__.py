from . import sketch  # noqa: F401 - registers sketch(k=, l=)
from . import sss  # noqa: F401 - registers sss(p=, d=)
from . import tri  # noqa: F401 - registers tri(k=, h=)
from . import sparse  # noqa: F401 - registers sparse(q=, s=) and butterfly()
