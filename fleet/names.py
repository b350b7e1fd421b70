"""The Ray names of a fleet's parts, in one place: every actor and app `fleet up` creates is found by name.

Everything lives in the Ray namespace NAMESPACE unless `fleet up --namespace` says otherwise.
"""

NAMESPACE = "fleet"
# the Ray namespace of the default fleet
CONTROLLER = "fleet-controller"
# the FleetController actor (desired counts and robot handles, so any shell finds the fleet)
REPLAY = "fleet-replay"
# the ReplayActor (the durable corrections log)
HEADS = "fleet-heads"
# the HeadRegistry actor (every published head version); replicas poll it, robots find direct sockets in it
LEARNER = "fleet-learner"
# the LearnerActor (`fleet up --adapt`)
APP = "fleet-policy"
# the Ray Serve application of the policy server
GATEWAY_PREFIX = "policy-gateway-"
# a node's PolicyGateway actor is named GATEWAY_PREFIX + app + "-" + node id
ONBOARD_PREFIX = "fleet-onboard-"
# the onboarding actor of a body added to a running fleet is named ONBOARD_PREFIX + embodiment
ROBOT_PREFIX = "robot-"
# robot actors are named robot_name(embodiment, i)


def robot_prefix(embodiment: str) -> str:
    """What every robot of `embodiment` is named with, its index after it: "robot-franka-"."""
    return f"{ROBOT_PREFIX}{embodiment}-"


def robot_name(embodiment: str, i: int) -> str:
    """The Ray name (and robot id) of robot `i` of `embodiment`: "robot-franka-0"."""
    return f"{robot_prefix(embodiment)}{i}"
