"""Drive a simulated fleet robot with openpi's own client, as an openpi robot runtime would.

Runs in openpi-client's venv (it pins numpy < 2, so not in the fleet's), with this repository on PYTHONPATH and
gymnasium installed there; the robot side is the fleet's sim and safety layer (numpy only):

    python3 -m venv /tmp/openpi && /tmp/openpi/bin/pip install openpi-client gymnasium
    PYTHONPATH=. /tmp/openpi/bin/python -m fleet.serving.openpi_drive ws://127.0.0.1:8001/franka \\
        --token "$(cat ~/.cache/fleet/api_token)" --episodes 3

Each control tick: the observation goes to `ActionChunkBroker(WebsocketClientPolicy(...), horizon)` under
openpi's LIBERO keys (`observation/image`, `observation/state`, `prompt`); the broker asks the server for a new
chunk every `horizon` ticks; the action passes the robot's SafetyLayer before `env.step`. Prints one JSON line.
Without openpi-client installed it says so and exits 2 (it never falls back to another client).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def drive(url: str, token: str | None, embodiment: str, episodes: int, horizon: int, seed: int) -> dict:
    from openpi_client.action_chunk_broker import ActionChunkBroker
    from openpi_client.base_policy import BasePolicy
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from fleet.control.safety import SafetyLayer
    from fleet.embodiments import EMBODIMENTS
    from fleet.sim import make_env

    spec = EMBODIMENTS[embodiment]
    client = WebsocketClientPolicy(url, api_key=token)
    meta = client.get_server_metadata()
    infer_ms: list[float] = []

    class Timed(BasePolicy):  # notes each server call's infer_ms on its way to the broker
        def infer(self, obs: dict) -> dict:
            reply = client.infer(obs)
            infer_ms.append(float(reply["server_timing"]["infer_ms"]))
            return reply

    broker = ActionChunkBroker(Timed(), action_horizon=horizon)
    env, safety = make_env(embodiment, seed=seed), SafetyLayer(spec)
    results = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        broker.reset()
        success, steps, t0 = False, 0, time.perf_counter()
        for steps in range(1, spec.max_episode_steps + 1):  # noqa: B007 - steps is reported
            out = broker.infer(
                {"observation/image": obs["image"], "observation/state": obs["proprio"], "prompt": obs["instruction"]}
            )
            action, _ = safety(out["actions"], proprio=obs["proprio"])
            obs, _, terminated, truncated, info = env.step(action)
            if info.get("is_success"):
                success = True
            if terminated or truncated:
                break
        results.append({"episode": ep, "success": success, "steps": steps, "seconds": time.perf_counter() - t0})
    return {
        "client": "openpi-client",
        "url": url,
        "embodiment": embodiment,
        "server": {k: meta.get(k) for k in ("server", "protocol")},
        "head_version": int(out["head_version"]),
        "episodes": results,
        "success_rate": sum(r["success"] for r in results) / len(results),
        "server_calls": len(infer_ms),
        "infer_ms_median": sorted(infer_ms)[len(infer_ms) // 2] if infer_ms else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="the fleet's openpi endpoint, e.g. ws://127.0.0.1:8001/franka (`fleet status`)")
    p.add_argument("--token", help="the fleet's endpoint token (~/.cache/fleet/api_token)")
    p.add_argument("--embodiment", default=None, help="the body to simulate (default: the URL's path)")
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--horizon", type=int, default=4, help="actions used from each chunk before asking again")
    p.add_argument("--seed", type=int, default=100)
    args = p.parse_args(argv)
    try:
        import openpi_client  # noqa: F401 - only to say clearly where it is missing
    except ImportError:
        print("openpi-client is not installed in this python: pip install openpi-client", file=sys.stderr)
        return 2
    embodiment = args.embodiment or args.url.rstrip("/").rsplit("/", 1)[-1]
    print(json.dumps(drive(args.url, args.token, embodiment, args.episodes, args.horizon, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
