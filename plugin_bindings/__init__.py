"""The game engine's clients of the scheduler: in process (client.py) and over the network (remote.py,
speaking ipc/GAME_PROTOCOL.md to `npc-scheduler serve`)."""

from plugin_bindings.client import AsyncGameClient, GameClient
from plugin_bindings.remote import (
    AsyncRemoteGameClient,
    RemoteGameClient,
    RemoteGameError,
    TickResult,
    UnknownNpcError,
)
from tier_scheduler.server import ActContext, ActResult, TalkResult

__all__ = ["ActContext", "ActResult", "AsyncGameClient", "AsyncRemoteGameClient", "GameClient",
           "RemoteGameClient", "RemoteGameError", "TalkResult", "TickResult", "UnknownNpcError"]
