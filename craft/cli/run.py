"""`python -m craft.cli.run ...`: the `craft` command as a module (same app, same arguments)."""

from craft.cli.main import main

if __name__ == "__main__":
    main()
