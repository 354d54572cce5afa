"""The interface packages built by setup import and carry the fields the nodes rely on."""
import numpy as np
import pytest

from m3_memory.ros.interfaces import fill_message, import_interface, message_to_data


def test_locate_service_fields():
    from m3_msgs.srv import Locate

    request, response = Locate.Request(), Locate.Response()
    assert request.get_fields_and_field_types() == {
        "query": "string", "frame_id": "string", "view": "geometry_msgs/Pose", "return_heatmap": "boolean",
        "max_instances": "uint32", "negatives": "sequence<string>"}
    assert response.get_fields_and_field_types() == {
        "success": "boolean", "message": "string", "target": "geometry_msgs/PointStamped",
        "grasp_pose": "geometry_msgs/PoseStamped", "score": "float", "heatmap": "sensor_msgs/Image",
        "heatmap_camera": "sensor_msgs/CameraInfo", "heatmap_view": "geometry_msgs/PoseStamped",
        "instances": "sequence<m3_msgs/Instance>"}


def test_train_action_parts():
    from m3_msgs.action import Train

    assert set(Train.Goal.get_fields_and_field_types()) == {"scene_dir", "output", "config_overrides", "robot",
                                                            "scan_id", "live", "base_memory"}
    assert {"iteration", "loss", "elapsed_seconds", "eta_seconds", "queue_position", "stage", "bytes_done",
            "bytes_total"} <= set(Train.Feedback.get_fields_and_field_types())
    assert {"success", "message", "checkpoint", "final_loss"} <= set(Train.Result.get_fields_and_field_types())


def test_status_messages_and_tf():
    from m3_msgs.msg import MemoryStatus, RecorderStatus
    from tf2_msgs.msg import TFMessage

    assert MemoryStatus.get_fields_and_field_types()["bank_sizes"] == "sequence<uint32>"
    assert RecorderStatus.get_fields_and_field_types()["reject_reasons"] == "sequence<string>"
    assert {"frames_dropped", "frames_pending", "transforms_ignored", "message"} <= set(
        RecorderStatus.get_fields_and_field_types())
    assert TFMessage.get_fields_and_field_types() == {"transforms": "sequence<geometry_msgs/TransformStamped>"}


def test_round_trip_through_serialization():
    from m3_msgs.srv import Locate
    from rclpy.serialization import deserialize_message, serialize_message

    request = fill_message(Locate.Request(), {"query": "yellow bath duck", "view": {"position": {"x": 1, "z": 0.5}}})
    back = deserialize_message(serialize_message(request), Locate.Request)
    assert back.query == "yellow bath duck"
    assert (back.view.position.x, back.view.position.z) == (1.0, 0.5)


def test_import_interface_names():
    assert import_interface("m3_msgs/srv/Locate").__name__ == "Locate"
    assert import_interface("m3_msgs/MemoryStatus").__name__ == "MemoryStatus"
    with pytest.raises(ValueError, match="PACKAGE/msg"):
        import_interface("Locate")
    with pytest.raises(ImportError, match="not installed"):
        import_interface("no_such_msgs/msg/Thing")
    with pytest.raises(ImportError, match="no interface named"):
        import_interface("m3_msgs/srv/Nothing")


def test_fill_message_rules():
    from m3_msgs.srv import Locate
    from sensor_msgs.msg import Image

    assert fill_message(Locate.Request(), "a red cube").query == "a red cube"
    with pytest.raises(ValueError, match="no field 'qeury'"):
        fill_message(Locate.Request(), {"qeury": "duck"})
    image = fill_message(Image(), {"height": 2, "width": 3, "data": list(range(6))})
    data = message_to_data(image, max_sequence=4)
    assert data["data"] == "<sequence of 6 elements>"
    assert message_to_data(image)["data"] == list(range(6))
    assert isinstance(np.asarray(image.data), np.ndarray)
