from .server_main import exit_process, main

exit_process(main())  # Note [Exit without teardown] in server_main.py
