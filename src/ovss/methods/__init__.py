"""The registered methods. Importing this package registers them."""
from ovss.methods import diffsegmenter  # noqa: F401
from ovss.methods import faseg  # noqa: F401
from ovss.methods import freeda  # noqa: F401
from ovss.methods import ovdiff  # noqa: F401
