#!/usr/bin/env bash
# SciFact on one GPU: mine once, then train/eval several recipes; results appended as each finishes.
# Ran when mpr train's default learning rate was 2e-5 (now 5e-5): runs that used that default pass it explicitly here.
DEADLINE=450
source "$(dirname "$0")/harness.sh"
run lsepair-e1 --loss lsepair --learning-rate 2e-5 --save-steps 5 --eval-steps 5 --eval-data $D
run lsepair-e2 --loss lsepair --epochs 2 --learning-rate 2e-5 --save-steps 25 --eval-steps 5 --eval-data $D
run bixse-e1 --loss bixse --learning-rate 2e-5 --save-steps 25 --eval-steps 5 --eval-data $D
run lsepair-e1-lr5 --loss lsepair --learning-rate 5e-5 --save-steps 25 --eval-steps 5 --eval-data $D
run bixse-e2 --loss bixse --epochs 2 --learning-rate 2e-5 --save-steps 25 --eval-steps 5 --eval-data $D
run infonce-e2 --loss infonce --epochs 2 --learning-rate 2e-5 --save-steps 25 --eval-steps 5 --eval-data $D
run lsepair-e3 --loss lsepair --epochs 3 --learning-rate 2e-5 --save-steps 25 --eval-steps 5 --eval-data $D
el ALLDONE
