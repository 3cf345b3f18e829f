"""Train and evaluate a model with RecBole's pipeline: the plugin's models (iLoRA) and every RecBole model.

    python run_recbole_ilora.py --model=iLoRA --dataset=ml-100k [--config_files="a.yaml b.yaml"] [--key=value ...]

Arguments behave as in RecBole's run_recbole.py: -m/--model, -d/--dataset, --config_files (space-separated),
and any other --key=value overrides a configuration key (RecBole's Config reads them from the command line).
"""

import argparse

from recbole_ilora.quick_start import run_recbole_ilora


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", type=str, default="iLoRA", help="model name (default: iLoRA)")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="dataset name (default: ml-100k)")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated YAML config files")
    args, _ = parser.parse_known_args()
    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    run_recbole_ilora(model=args.model, dataset=args.dataset, config_file_list=config_file_list)


if __name__ == "__main__":
    main()
