"""Spec + topology -> Plan: what each mirror should be doing right now, and why."""

from .build import build as build
from .build import collector_keys as collector_keys
from .build import exclusions as exclusions
from .frames import tunnels as tunnels
from .model import CloneRule as CloneRule
from .model import FrameRule as FrameRule
from .model import FrameSupport as FrameSupport
from .model import MirrorPlan as MirrorPlan
from .model import Plan as Plan
from .model import State as State
from .model import TapState as TapState
from .model import TransportName as TransportName
from .model import TzspTap as TzspTap
from .model import Way as Way
from .reasons import Code as Code
from .reasons import Reason as Reason
