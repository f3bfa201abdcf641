"""One process of a training run on several GPUs: started by torchrun, which modal_jobs.train.distributed.launch
runs from inside the train job (an entry of its own, so that the package, which imports `distributed`, is not
also run as __main__).

Run as: (started by the train job) python -m torch.distributed.run --standalone --nproc_per_node N \
            -m modal_jobs.train REQUEST.json RESULT.json
"""

import sys

from modal_jobs.train.distributed import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
