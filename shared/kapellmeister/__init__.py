"""kapellmeister: saga and workflow orchestration for asyncio services over NATS JetStream.

Re-exports only what services use; everything else is imported from its module.
"""

from kapellmeister.agent import TaskSpec, run_agent, task
from kapellmeister.conductor import Conductor
from kapellmeister.config import Settings
from kapellmeister.definitions import load_definitions
from kapellmeister.errors import BadRequest, TaskError
from kapellmeister.rates import Rate
from kapellmeister.registry import Registry
from kapellmeister.runtime import connect, disconnect, run_service

__all__ = [
    "BadRequest",
    "Conductor",
    "Rate",
    "Registry",
    "Settings",
    "TaskError",
    "TaskSpec",
    "connect",
    "disconnect",
    "load_definitions",
    "run_agent",
    "run_service",
    "task",
]
