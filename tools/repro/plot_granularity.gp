# gnuplot -e "dat='tools/repro/results/granularity.dat'; out='docs/img/granularity.png'" tools/repro/plot_granularity.gp
set terminal pngcairo size 800,450 font "DejaVu Sans,11"
set output out
set title "train_domains: granularity at constant active parameters (1500 steps x 512 tokens)" noenhanced
set xlabel "granularity G (G*8 experts of 128/G, top-2G)"
set logscale x 2
set xrange [0.9:9]
set xtics (1, 2, 4, 8)
set ylabel "held-out loss (nats)"
set y2label "training tokens/s (1 thread)"
set ytics nomirror
set y2tics
set key top center
set grid
plot dat using 1:2 with linespoints lw 2 pt 7 title "held-out loss", \
     dat using 1:3 axes x1y2 with linespoints lw 2 pt 5 dt 2 title "tokens/s"
