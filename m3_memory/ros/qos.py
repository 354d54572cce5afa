"""QoS profiles shared by the m3 nodes."""
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

# Status topics are latched so a late `ros2 topic echo` or GUI sees the current state at once.
LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)

# tf2's conventions: /tf_static is latched and reliable, /tf is a reliable stream.
TF_STATIC_QOS = QoSProfile(depth=100, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
TF_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
