"""Spec + topology -> Plan: what each mirror should be doing right now, and why."""

from .build import (
    CloneRule as CloneRule,
)
from .build import (
    MirrorPlan as MirrorPlan,
)
from .build import (
    Plan as Plan,
)
from .build import (
    State as State,
)
from .build import (
    TapState as TapState,
)
from .build import (
    TransportName as TransportName,
)
from .build import (
    TzspTap as TzspTap,
)
from .build import (
    Way as Way,
)
from .build import (
    build as build,
)
from .build import (
    collector_keys as collector_keys,
)
from .build import (
    exclusions as exclusions,
)
from .reasons import (
    Code as Code,
)
from .reasons import (
    Reason as Reason,
)
