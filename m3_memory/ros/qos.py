"""QoS profiles shared by the m3 nodes."""
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

# Status topics are latched so a late `ros2 topic echo` or GUI sees the current state at once.
LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)

# tf2's conventions: /tf_static is latched and reliable, /tf is a reliable stream (what broadcasters offer).
TF_STATIC_QOS = QoSProfile(depth=100, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
TF_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)

# Taking in /tf for posing frames: best effort matches reliable and best-effort broadcasters alike, and a sample lost on
# the wire is interpolated across instead of holding every later one back: a reliable reader delivers in order, and
# Fast DDS repaired a lost /tf sample only at its writer's next heartbeat, which held the whole stream up to 1.9 s
# (measured) while the images went on. Deep enough for 20 s of 50 Hz TF behind a busy process.
TF_INTAKE_QOS = QoSProfile(depth=1000, reliability=ReliabilityPolicy.BEST_EFFORT)
