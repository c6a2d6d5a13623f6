"""The game engine's client of the scheduler (in process for now: the networked protocol is not built yet)."""

from plugin_bindings.client import AsyncGameClient, GameClient
from tier_scheduler.server import ActContext, ActResult, TalkResult

__all__ = ["ActContext", "ActResult", "AsyncGameClient", "GameClient", "TalkResult"]
