"""``python -m perf``: run the performance benchmark."""
from perf.bench import main

if __name__ == "__main__":
    main()
