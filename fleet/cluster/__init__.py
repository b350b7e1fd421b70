"""Running a fleet on Ray: the launcher (up, scale, status, down) and the private local Ray head.

config.py      FleetConfig: what `fleet up` starts, validated (no Ray)
launcher.py    connect / up / scale / status / down (imports Ray lazily)
local_head.py  the private `ray start --head` for `fleet up`, its token and state file (subprocesses only)
"""
