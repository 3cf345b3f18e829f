"""Train and evaluate a model with RecBole's pipeline: the plugin's models (iLoRA) and every RecBole model.

    python run_recbole_ilora.py --model=iLoRA --dataset=ml-100k [--config_files="a.yaml b.yaml"] [--key=value ...]
    python run_recbole_ilora.py --model=iLoRA --dataset=ml-100k --nproc=2 --dist_backend=gloo   # 2 CPU processes

Arguments behave as in RecBole's run_recbole.py: -m/--model, -d/--dataset, --config_files (space-separated),
--nproc, --world_size, --ip, --port, --group_offset (RecBole's distributed mode), and any other --key=value
overrides a configuration key (RecBole's Config reads them from the command line).
"""

import argparse

from recbole_ilora.quick_start import run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", type=str, default="iLoRA", help="model name (default: iLoRA)")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="dataset name (default: ml-100k)")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated YAML config files")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (default: 1)")
    parser.add_argument("--world_size", type=int, default=-1, help="processes on all machines (default: nproc)")
    parser.add_argument("--ip", type=str, default="localhost", help="address of the first machine")
    parser.add_argument("--port", type=str, default="5678", help="a free port on the first machine")
    parser.add_argument("--group_offset", type=int, default=0, help="rank of this machine's first process")
    args, _ = parser.parse_known_args()
    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    run(
        model=args.model,
        dataset=args.dataset,
        config_file_list=config_file_list,
        nproc=args.nproc,
        world_size=args.world_size,
        ip=args.ip,
        port=args.port,
        group_offset=args.group_offset,
    )


if __name__ == "__main__":
    main()
