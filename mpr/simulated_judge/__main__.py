from mpr.simulated_judge import main

main()
