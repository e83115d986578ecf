"""The mirror spec: YAML -> a typed, validated `Spec` (schema), and what `mirrord check`
finds from the spec alone (loops)."""

from .schema import (
    BACKENDS as BACKENDS,
)
from .schema import (
    DEFAULT_PATH as DEFAULT_PATH,
)
from .schema import (
    DIRECTIONS as DIRECTIONS,
)
from .schema import (
    FAMILIES as FAMILIES,
)
from .schema import (
    IFNAMSIZ as IFNAMSIZ,
)
from .schema import (
    INTERNAL_ERROR as INTERNAL_ERROR,
)
from .schema import (
    MAX_ALIAS_NODES as MAX_ALIAS_NODES,
)
from .schema import (
    MAX_BYTES as MAX_BYTES,
)
from .schema import (
    MAX_DEPTH as MAX_DEPTH,
)
from .schema import (
    MAX_LINE as MAX_LINE,
)
from .schema import (
    MAX_NODES as MAX_NODES,
)
from .schema import (
    MAX_PROBLEMS as MAX_PROBLEMS,
)
from .schema import (
    MAX_SHOWN as MAX_SHOWN,
)
from .schema import (
    NAME_RE as NAME_RE,
)
from .schema import (
    TRANSPORTS as TRANSPORTS,
)
from .schema import (
    TZSP_PORT as TZSP_PORT,
)
from .schema import (
    Backend as Backend,
)
from .schema import (
    Collector as Collector,
)
from .schema import (
    Direction as Direction,
)
from .schema import (
    Mirror as Mirror,
)
from .schema import (
    Spec as Spec,
)
from .schema import (
    SpecError as SpecError,
)
from .schema import (
    Transport as Transport,
)
from .schema import (
    default_path as default_path,
)
from .schema import (
    host_address as host_address,
)
from .schema import (
    load as load,
)
from .schema import (
    parse as parse,
)
from .schema import (
    show as show,
)
from .schema import (
    valid_ifname as valid_ifname,
)
