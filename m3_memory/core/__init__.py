"""Pure torch/numpy engine of m3-memory: no ROS import anywhere below this package."""
