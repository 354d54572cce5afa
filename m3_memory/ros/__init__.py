"""Thin rclpy nodes that translate ROS messages into m3_memory.core calls."""
