from m3_memory.venv_ros2.cli import main

raise SystemExit(main())
