"""The venv `ros2` and `m3` commands against real node processes over DDS."""
import yaml

from conftest import run_command


def response_of(output: str) -> dict:
    assert "response:" in output, output
    return yaml.safe_load(output.split("response:", 1)[1])


def test_help_lists_verbs():
    ros2 = run_command("ros2", "--help", check=True).stdout
    for verb in ("launch", "run", "service", "topic", "node"):
        assert verb in ros2
    m3 = run_command("m3", "--help", check=True).stdout
    for verb in ("locate", "demo-scene"):
        assert verb in m3


def test_service_call_with_a_bare_phrase(memory_server):
    result = run_command("ros2", "service", "call", "/m3/locate", "yellow bath duck", check=True)
    response = response_of(result.stdout)
    assert response["success"] is False
    assert "no memory loaded" in response["message"]
    assert "query: yellow bath duck" in result.stdout


def test_service_call_with_type_and_yaml(memory_server):
    result = run_command("ros2", "service", "call", "/m3/locate", "m3_msgs/srv/Locate",
                         "{query: red cube, frame_id: world}", check=True)
    assert "frame_id: world" in result.stdout
    assert response_of(result.stdout)["success"] is False


def test_bad_requests_get_a_message_not_a_crash(memory_server):
    empty = response_of(run_command("ros2", "service", "call", "/m3/locate", "{query: '  '}", check=True).stdout)
    assert empty["success"] is False and "empty" in empty["message"]
    huge = response_of(run_command("ros2", "service", "call", "/m3/locate", "x" * 10_000, check=True).stdout)
    assert huge["success"] is False and "10000 characters" in huge["message"]
    # The server is still there and answering after the bad requests.
    again = response_of(run_command("ros2", "service", "call", "/m3/locate", "mug", check=True).stdout)
    assert "no memory loaded" in again["message"]
    assert memory_server.poll() is None


def test_malformed_request_is_refused_by_the_client(memory_server):
    result = run_command("ros2", "service", "call", "/m3/locate", "m3_msgs/srv/Locate", "{qeury: duck}")
    assert result.returncode == 2
    assert "no field 'qeury'" in result.stderr
    number = run_command("ros2", "service", "call", "/m3/locate", "m3_msgs/srv/Locate", "{query: 5}")
    assert number.returncode == 2 and "query is text, got 5" in number.stderr       # not an interpreter abort
    nul = run_command("ros2", "service", "call", "/m3/locate", "m3_msgs/srv/Locate", "{query: \"duck\\0evil\"}")
    assert nul.returncode == 2 and "NUL" in nul.stderr                             # refused, not cut to "duck"


def test_missing_service_times_out_with_a_message():
    result = run_command("ros2", "service", "call", "/m3/nothing_here", "duck", "--timeout", "1")
    assert result.returncode == 1
    assert "not found" in result.stderr


def test_service_list_and_type(memory_server):
    listed = run_command("ros2", "service", "list", "-t", check=True).stdout
    assert "/m3/locate [m3_msgs/srv/Locate]" in listed
    assert run_command("ros2", "service", "type", "/m3/locate", check=True).stdout.strip() == "m3_msgs/srv/Locate"


def test_topic_list_and_echo_latched_status(memory_server):
    assert "/m3/memory_status" in run_command("ros2", "topic", "list", check=True).stdout
    echoed = run_command("ros2", "topic", "echo", "/m3/memory_status", "--once", check=True).stdout
    status = yaml.safe_load(echoed.split("---")[0])
    assert status["loaded"] is False
    assert status["world_frame"] == ""          # no memory yet, no world_frame parameter: the memory's frame, unknown


def test_m3_locate_reports_the_server_answer(memory_server):
    result = run_command("m3", "locate", "yellow bath duck", "--json")
    assert result.returncode == 1
    answer = yaml.safe_load(result.stdout.strip().splitlines()[-1])
    assert answer["query"] == "yellow bath duck" and answer["success"] is False
    assert "no memory loaded" in answer["message"]
